"""Classification metrics computed from the confusion matrix, a readable report, and a PNG.

Definitions (as in scikit-learn's `classification_report`): for class c with true
positives TP, false positives FP and false negatives FN,
    precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R),
each taken as 0 when its denominator is 0. Macro averages are unweighted means over the
classes; accuracy is the trace of the confusion matrix over its sum.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from minigpt.files import EVAL_AGAIN, write_text, writing


@dataclass(frozen=True)
class ClassMetrics:
    label: str
    precision: float
    recall: float
    f1: float
    support: int
    """Rows whose true label is this class."""


@dataclass(frozen=True)
class ClassificationReport:
    labels: tuple[str, ...]
    confusion: tuple[tuple[int, ...], ...]
    """confusion[i][j]: rows of true class i predicted as class j."""
    per_class: tuple[ClassMetrics, ...]
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    majority_baseline: float
    """Accuracy of always predicting the most frequent true class: the bar to beat."""

    @property
    def n(self) -> int:
        return sum(map(sum, self.confusion))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["n"] = self.n
        return out

    def format(self) -> str:
        """A fixed-width table in the style of scikit-learn's classification_report."""
        width = max(12, *(len(label) for label in self.labels))
        lines = [f"{'':>{width}}  precision  recall  f1-score  support"]
        for m in self.per_class:
            lines.append(f"{m.label:>{width}}  {m.precision:9.3f}  {m.recall:6.3f}  {m.f1:8.3f}  {m.support:7d}")
        lines.append("")
        lines.append(f"{'macro avg':>{width}}  {self.macro_precision:9.3f}  {self.macro_recall:6.3f}  "
                     f"{self.macro_f1:8.3f}  {self.n:7d}")
        lines.append(f"{'accuracy':>{width}}  {'':9}  {'':6}  {self.accuracy:8.3f}  {self.n:7d}")
        lines.append(f"{'majority':>{width}}  {'':9}  {'':6}  {self.majority_baseline:8.3f}  {self.n:7d}")
        lines.append("")
        lines.append("confusion matrix (rows: true, columns: predicted)")
        cell = max(6, *(len(label) for label in self.labels), *(len(str(v)) for row in self.confusion for v in row))
        lines.append(f"{'':>{width}}  " + " ".join(f"{label:>{cell}}" for label in self.labels))
        for label, row in zip(self.labels, self.confusion):
            lines.append(f"{label:>{width}}  " + " ".join(f"{v:>{cell}d}" for v in row))
        return "\n".join(lines)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> list[list[int]]:
    """counts[i][j] of rows with true class i and predicted class j (ids in 0..num_labels-1)."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} entries but y_pred has {len(y_pred)}")
    counts = [[0] * num_labels for _ in range(num_labels)]
    for t, p in zip(y_true, y_pred):
        if not (0 <= t < num_labels and 0 <= p < num_labels):
            raise ValueError(f"class ids must be in 0..{num_labels - 1}; got true={t}, predicted={p}")
        counts[t][p] += 1
    return counts


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> ClassificationReport:
    """Accuracy, per-class and macro precision/recall/F1, and the confusion matrix.

    y_true, y_pred: class ids indexing `labels`. Raises ValueError when empty or mismatched.
    """
    if not y_true:
        raise ValueError("no rows to evaluate")
    k = len(labels)
    cm = confusion_matrix(y_true, y_pred, k)
    per_class = []
    for c in range(k):
        tp = cm[c][c]
        predicted = sum(cm[r][c] for r in range(k))
        support = sum(cm[c])
        p, r = _ratio(tp, predicted), _ratio(tp, support)
        per_class.append(ClassMetrics(labels[c], p, r, _ratio(2 * p * r, p + r), support))
    n = len(y_true)
    return ClassificationReport(
        labels=tuple(labels),
        confusion=tuple(tuple(row) for row in cm),
        per_class=tuple(per_class),
        accuracy=sum(cm[c][c] for c in range(k)) / n,
        macro_precision=sum(m.precision for m in per_class) / k,
        macro_recall=sum(m.recall for m in per_class) / k,
        macro_f1=sum(m.f1 for m in per_class) / k,
        majority_baseline=max(m.support for m in per_class) / n,
    )


def plot_confusion_matrix(report: ClassificationReport, path: str | Path, title: str = "") -> Path:
    """Draw the confusion matrix (counts, shaded by row-normalised recall) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(report.labels)
    rows = [[v / max(1, sum(row)) for v in row] for row in report.confusion]
    size = 2.0 + 0.7 * k
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    image = ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(k), report.labels, rotation=45, ha="right")
    ax.set_yticks(range(k), report.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(report.confusion[i][j]), ha="center", va="center",
                    color="white" if rows[i][j] > 0.5 else "black")
    ax.set_title(title or f"accuracy {report.accuracy:.3f}, macro F1 {report.macro_f1:.3f} (n={report.n})")
    fig.tight_layout()
    path = Path(path)
    try:
        with writing(path, EVAL_AGAIN):
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def write_report(report, folder: str | Path, extra: dict | None = None) -> None:
    """The one writer of an evaluation folder, for every report kind: metrics.json
    (`report.to_dict()` and `extra`), report.txt (`report.format()`) and, when the report
    holds a classification (a classifier's, or an as-completion model's label scores),
    confusion_matrix.png."""
    folder = Path(folder)
    with writing(folder, EVAL_AGAIN):
        folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "metrics.json", json.dumps({**report.to_dict(), **(extra or {})}, indent=2) + "\n",
               EVAL_AGAIN)
    write_text(folder / "report.txt", report.format() + "\n", EVAL_AGAIN)
    classification = getattr(report, "classification", report)
    if isinstance(classification, ClassificationReport):
        plot_confusion_matrix(classification, folder / "confusion_matrix.png")
