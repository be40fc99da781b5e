"""The classify task: labeled rows, a head on the last token.

Its rows are read here (a text and a label column of any file `read_records` reads; label
spellings that differ only by case are an error or merged), split (the validation file,
else a stratified split that keeps repeated texts on one side), encoded (each text's first
max_length tokens) and batched; the model is the backbone in a `GPTClassifier`, trained
with cross-entropy (class-weighted if asked), reporting val_accuracy and val_macro_f1 at
each evaluation and a classification report at the end.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt.finetune.classifier import ClassificationLoss, GPTClassifier, balanced_class_weights, predict_proba
from minigpt.finetune.config import ClassifyData, LabeledData
from minigpt.finetune.data import (
    ClassificationExample, LabelMap, collate_classification, encode_text, fixed_batches, row_name,
)
from minigpt.finetune.metrics import ClassificationReport, classification_report
from minigpt.finetune.records import read_records
from minigpt.finetune.split import report_leakage, split_without_leakage
from minigpt.finetune.task import RunStart, TaskRun
from minigpt.progress import progress_bar

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class LabeledText:
    text: str
    label: str
    line: int
    """Line (CSV/TSV: row, counting the header as line 1) in the source file, for messages."""


def read_labeled(path: str | Path, text_column: str = "text", label_column: str = "label",
                 fmt: str | None = None, *, encoding: str = "utf-8", merge_label_case: bool = False,
                 known_labels: Sequence[str] = ()) -> list[LabeledText]:
    """Rows of a CSV/TSV file (with a header), a JSON array or a JSONL file, as (text, label)
    pairs (read by `minigpt.finetune.records.read_records`, so a row with the wrong number
    of fields or undecodable bytes is an error naming its line).

    Labels that differ only by case or surrounding whitespace ("Positive", "positive ") are
    an error listing the spellings and their counts, unless `merge_label_case`, which maps
    them to one spelling (see `merge_label_spellings`; `known_labels`, e.g. a model's,
    win). Raises ValueError naming the file and line for a missing column, an empty text
    or label, or a line that is not a JSON object; FileNotFoundError for a missing file.
    """
    path = Path(path)
    table = read_records(path, fmt, encoding)
    table.require_columns((text_column, label_column), "text_column=/label_column= (--text-column/--label-column)")
    if table.bad:
        bad = table.bad[0]
        raise ValueError(f"{path}:{bad.line}: {bad.reason}" + (f" (and {len(table.bad) - 1} more such lines)"
                                                                if len(table.bad) > 1 else ""))
    out = []
    for record in table.records:
        row, line_no = record.values, record.line
        for column in (text_column, label_column):
            if column not in row:
                raise ValueError(f"{path}:{line_no}: no field {column!r}; it has {sorted(row)}")
        text, label = row[text_column], row[label_column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{line_no}: empty {text_column!r}")
        if label is None or not str(label).strip():
            raise ValueError(f"{path}:{line_no}: empty {label_column!r}")
        out.append(LabeledText(text, str(label), line_no))
    if not out:
        raise ValueError(f"{path} holds no rows")
    return merge_label_spellings(out, merge_label_case, known_labels, source=str(path))


def _label_key(label: str) -> str:
    return label.strip().casefold()


def merge_label_spellings(rows: Sequence[LabeledText], merge: bool = False, known: Sequence[str] = (),
                          source: str = "the data") -> list[LabeledText]:
    """Labels as classes: surrounding whitespace is never part of a label, and spellings
    that differ only by case or surrounding whitespace are one class only when asked.

    Why an error by default: "Positive" and "positive" silently becoming two classes
    trains a wrong model, and silently merging could hide a real distinction (or a data
    bug worth seeing). With `merge`, each group takes the spelling in `known` (e.g. the
    training labels, or a model's) when there is one, else its most frequent spelling
    (ties: the first in sorted order), and a warning lists what was merged.
    Raises ValueError naming the spellings and their counts when not merging.
    """
    spellings: dict[str, dict[str, int]] = {}
    for r in rows:
        counts = spellings.setdefault(_label_key(r.label), {})
        counts[r.label] = counts.get(r.label, 0) + 1
    clashes = {key: counts for key, counts in spellings.items() if len(counts) > 1}
    if clashes and not merge:
        shown = "; ".join(" vs ".join(f"{s!r} ({n} rows)" for s, n in sorted(c.items())) for c in clashes.values())
        raise ValueError(f"{source}: labels differ only by case or surrounding whitespace: {shown}. They would be "
                         f"separate classes; fix the file, or merge them with merge_label_case=True "
                         f"(--merge-label-case)")
    known_by_key = {_label_key(k): k for k in known}
    canonical = {}
    for key, counts in spellings.items():
        top = min(counts, key=lambda s: (-counts[s], s))
        canonical[key] = known_by_key.get(key, top.strip()) if merge else top.strip()
        changed = {s: n for s, n in counts.items() if s.strip() != canonical[key]}
        if changed:
            log.warning("%s: merged the labels %s into %r", source,
                        ", ".join(f"{s!r} ({n} rows)" for s, n in sorted(counts.items())), canonical[key])
    return [r if r.label == canonical[_label_key(r.label)] else
            LabeledText(r.text, canonical[_label_key(r.label)], r.line) for r in rows]


def labeled_split(data: LabeledData) -> tuple[list[LabeledText], list[LabeledText], LabelMap, int]:
    """(training rows, validation rows, labels, validation rows also in training): the
    validation file, else a stratified split that keeps repeats together."""
    files = data.files

    def read(path: str, known: tuple[str, ...] = ()) -> list[LabeledText]:
        return read_labeled(path, data.text_column, data.label_column, encoding=files.encoding,
                            merge_label_case=data.merge_label_case, known_labels=known)

    rows = read(files.train_file)
    leaks = 0
    if files.val_file is not None:
        val_rows = read(files.val_file, tuple(sorted({r.label for r in rows})))
        leaks = report_leakage(rows, val_rows, lambda r: r.text, files.train_file, files.val_file, "text")
    else:
        rows, val_rows = split_without_leakage(rows, files.val_fraction, files.split_seed, files.train_file)
        log.info("no validation file: held out %d of %d rows (stratified, seed %d)",
                 len(val_rows), len(rows) + len(val_rows), files.split_seed)
    labels = LabelMap.from_examples(rows)
    unseen = sorted({r.label for r in val_rows} - set(labels.labels))
    if unseen:
        raise ValueError(f"validation labels {unseen} never occur in the training data {files.train_file} "
                         f"(its labels: {list(labels.labels)})")
    return rows, val_rows, labels, leaks


# ----------------------------------------------------------------------------- encoding
def encode_classification(tokenizer, examples: Sequence[LabeledText], labels: LabelMap,
                          max_length: int, source: str | Path | None = None) -> list[ClassificationExample]:
    """Token ids (the first `max_length` of each text) and label ids. Truncation is logged.
    `source` is the file the rows came from, named in errors with the row's line."""
    out, truncated = [], 0
    for e in examples:
        ids = encode_text(tokenizer, e.text, source, e.line)
        if not ids:
            raise ValueError(f"{row_name(source, e.line)}: text {e.text!r} encodes to no tokens")
        truncated += len(ids) > max_length
        out.append(ClassificationExample(tuple(ids[:max_length]), labels.id(e.label)))
    if truncated:
        log.warning("%d of %d texts were longer than max_length=%d tokens and were truncated",
                    truncated, len(examples), max_length)
    return out



# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def classify(model: GPTClassifier, examples: Sequence[ClassificationExample], batch_size: int = 64,
             pad_id: int = 0) -> torch.Tensor:
    """(N, num_labels) probabilities for encoded examples, on the model's device."""
    device = next(model.parameters()).device
    out = []
    batches = fixed_batches(examples, batch_size, lambda xs: collate_classification(xs, pad_id))
    for batch in progress_bar(batches, math.ceil(len(examples) / batch_size), "classify"):
        out.append(predict_proba(model, {k: v.to(device) for k, v in batch.items()}).cpu())
    return torch.cat(out)


def evaluate_classifier(model: GPTClassifier, tokenizer, rows: Sequence[LabeledText], labels: LabelMap,
                        max_length: int, batch_size: int = 64) -> ClassificationReport:
    """The classification report of `model` on labeled rows. A row whose label the model
    does not know is a ValueError naming it."""
    examples = encode_classification(tokenizer, rows, labels, max_length)
    predicted = classify(model, examples, batch_size, pad_id=tokenizer.eos_id or 0).argmax(-1).tolist()
    return classification_report([e.label for e in examples], predicted, labels.labels)



# ---------------------------------------------------------------------------------- run
def classify_run(data: ClassifyData, start: RunStart) -> TaskRun:
    """A `GPTClassifier` on the labeled rows of `data`."""
    rows, val_rows, labels, leaks = labeled_split(data.rows)
    block_size = start.backbone.config.block_size
    max_length = min(data.rows.max_length or block_size, block_size)
    tokenizer, batch_size = start.tokenizer, start.eval_batch_size
    pad = tokenizer.eos_id or 0
    train_examples = encode_classification(tokenizer, rows, labels, max_length, data.rows.files.train_file)
    val_examples = encode_classification(tokenizer, val_rows, labels, max_length, data.rows.files.val_source)
    weights = None
    if data.class_weights == "balanced":
        weights = balanced_class_weights([e.label for e in train_examples], len(labels))
        log.info("class weights: %s", dict(zip(labels.labels, (round(w, 3) for w in weights))))

    def collate(examples):
        return collate_classification(examples, pad)

    def extra_eval(model) -> dict[str, float]:
        predicted = classify(model, val_examples, batch_size, pad).argmax(-1).tolist()
        report = classification_report([e.label for e in val_examples], predicted, labels.labels)
        return {"val_accuracy": report.accuracy, "val_macro_f1": report.macro_f1}

    model = GPTClassifier(start.backbone, len(labels))
    counts = {label: sum(r.label == label for r in rows) for label in labels.labels}
    details = {"train_rows": len(rows), "val_rows": len(val_rows), "val_rows_in_train": leaks,
               "train_label_counts": counts, "class_weights": weights,
               **start.choose_trainable(model, ("score.",))}
    return TaskRun(
        model=model,
        train_batches=start.batches(train_examples, collate),
        eval_batches=lambda: fixed_batches(val_examples, batch_size, collate),
        loss_fn=ClassificationLoss(weights),
        extra_eval=extra_eval,
        evaluate=lambda model: evaluate_classifier(model, tokenizer, val_rows, labels, max_length, batch_size),
        meta=start.meta("classify", details, max_length=max_length),
        labels=labels,
        details=details,
    )
