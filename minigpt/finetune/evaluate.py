"""Evaluate fine-tuned models and few-shot prompting on files; predict labels (`minigpt
evaluate`, `minigpt fewshot`, `minigpt predict`). The reports themselves are each task's
(`minigpt.finetune.classify`, `.completion`, `.as_completion`).

Classifiers get accuracy, per-class and macro precision/recall/F1, the confusion matrix
(as text and PNG) and the majority-class baseline beside them. Completion models get the
loss over completion tokens (the training objective, averaged per token), its perplexity,
and exact match of greedy completions on held-out prompts. Classifiers taught as completion
(`minigpt.finetune.as_completion`) get the classifier's report, labels scored by likelihood.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from minigpt.finetune.as_completion import evaluate_saved, is_as_completion
from minigpt.finetune.classify import LabeledText, classify, encode_classification, evaluate_classifier, read_labeled
from minigpt.finetune.completion import CompletionReport, evaluate_completion, read_prompt_completion
from minigpt.finetune.data import LabelMap
from minigpt.finetune.export import load_finetuned
from minigpt.evaluation.harness import evaluate_examples
from minigpt.evaluation.tasks import Task
from minigpt.finetune.fewshot import FewShotPrompt, as_multiple_choice, choose, prompt_format, select_shots
from minigpt.finetune.metrics import ClassificationReport, classification_report, write_report
from minigpt.typed import check_count

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- file level
def evaluate(model_dir: str | Path, data_file: str | Path, *, out_dir: str | Path | None = None,
             text_column: str = "text", label_column: str = "label", prompt_column: str = "prompt",
             completion_column: str = "completion", encoding: str = "utf-8", merge_label_case: bool = False,
             batch_size: int = 32, max_generate: int = 100, device: str = "cpu"
             ) -> ClassificationReport | CompletionReport:
    """Evaluate a fine-tuned folder on a labeled file (classifier) or a prompt/completion
    file (completion model); either may be CSV, TSV, a JSON array or JSONL. With
    merge_label_case, labels that differ from the model's only by case or surrounding
    whitespace count as the model's. With out_dir, write metrics.json and report.txt there
    (and confusion_matrix.png for a classifier). Returns the report; `.format()` reads well."""
    check_count("batch_size", batch_size, 1, "it counts rows per forward pass")
    check_count("max_generate", max_generate, 0, "0 skips exact match")
    model, tokenizer, meta, labels = load_finetuned(model_dir)
    model.to(device)
    extra = {"model": str(model_dir), "data": str(data_file)}
    if meta.task == "classify":
        rows = read_labeled(data_file, text_column, label_column, encoding=encoding,
                            merge_label_case=merge_label_case, known_labels=labels.labels)
        report = evaluate_classifier(model, tokenizer, rows, labels, meta.max_length or model.config.block_size,
                                     batch_size)
        if out_dir is not None:
            write_report(report, out_dir, extra)
        return report
    if is_as_completion(meta.details):  # a classifier taught as completion: score its labels
        rows = read_labeled(data_file, text_column, label_column, encoding=encoding,
                            merge_label_case=merge_label_case, known_labels=tuple(meta.details["labels"]))
        report = evaluate_saved(model, tokenizer, meta.details, rows, batch_size)
        if out_dir is not None:
            write_report(report, out_dir, extra)
        return report
    pairs = read_prompt_completion(data_file, prompt_column, completion_column, encoding)
    report = evaluate_completion(model, tokenizer, pairs, stop=meta.stop,
                                 max_generate=max_generate, batch_size=batch_size)
    if out_dir is not None:
        write_report(report, out_dir, extra)
    return report


def evaluate_fewshot(model_dir: str | Path, shots_file: str | Path, data_file: str | Path, *, k: int = 4,
                     prompt: FewShotPrompt = FewShotPrompt(), seed: int = 1337, limit: int | None = None,
                     out_dir: str | Path | None = None, text_column: str = "text", label_column: str = "label",
                     encoding: str = "utf-8", merge_label_case: bool = False, device: str = "cpu"
                     ) -> ClassificationReport:
    """Few-shot classification by prompting a plain language model (any model folder):
    k balanced shots from `shots_file`, every label scored on each row of `data_file` (its
    first `limit` rows when given). Returns the report; writes it to out_dir when given."""
    from minigpt.model import GPT
    from minigpt.tokenizer import load_tokenizer

    check_count("k", k, 0, "0 classifies zero-shot")
    if limit is not None:
        check_count("limit", limit, 1, "leave --limit out to evaluate every row")
    model = GPT.from_pretrained(model_dir).to(device)
    tokenizer = load_tokenizer(model_dir)
    pool = read_labeled(shots_file, text_column, label_column, encoding=encoding, merge_label_case=merge_label_case)
    known = tuple(sorted({r.label for r in pool}))
    rows = read_labeled(data_file, text_column, label_column, encoding=encoding, merge_label_case=merge_label_case,
                        known_labels=known)[:limit]
    labels = LabelMap.from_examples(pool)
    unknown = sorted({r.label for r in rows} - set(labels.labels))
    if unknown:
        raise ValueError(f"{data_file} has labels {unknown} that no example in {shots_file} has")
    shots = select_shots(pool, k, seed)
    task = Task(Path(data_file).stem, "multiple_choice",
                tuple(as_multiple_choice(r.text, r.label, labels.labels, prompt, r.line) for r in rows))
    demos = [as_multiple_choice(s.text, s.label, labels.labels, prompt, s.line) for s in shots]
    result = evaluate_examples(model, tokenizer, task, fixed_demos=demos, fmt=prompt_format(prompt),
                               progress=len(rows) > 50)
    predicted = [choose(r["loglikelihoods"], r["tokens"], prompt.normalize) for r in result.examples]
    report = classification_report([labels.id(r.label) for r in rows], predicted, labels.labels)
    if out_dir is not None:
        example = prompt.render(shots, "<text>")
        write_report(report, out_dir, {"model": str(model_dir), "data": str(data_file), "k": k, "prompt": example})
    return report


# ------------------------------------------------------------------------------- predict
@dataclass(frozen=True)
class Prediction:
    text: str
    label: str
    probabilities: dict[str, float]


def read_texts(path: str | Path, text_column: str = "text", encoding: str = "utf-8") -> list[str]:
    """Texts to classify: a .txt file (one per non-blank line) or a CSV/TSV/JSON/JSONL column
    (read by `minigpt.finetune.records.read_records`)."""
    from minigpt.finetune.records import decode, read_records

    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        text = decode(path, path.read_bytes(), encoding)
        return [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    table = read_records(path, encoding=encoding)
    table.require_columns((text_column,), "--text-column")
    if table.bad:
        raise ValueError(f"{path}:{table.bad[0].line}: {table.bad[0].reason}")
    missing = [r.line for r in table.records if not isinstance(r.values.get(text_column), str)]
    if missing:
        raise ValueError(f"{path}:{missing[0]}: no text in {text_column!r} ({len(missing)} such rows)")
    return [r.values[text_column] for r in table.records]


def predict(model_dir: str | Path, texts: Sequence[str] = (), *, file: str | Path | None = None,
            text_column: str = "text", encoding: str = "utf-8", batch_size: int = 32, device: str = "cpu"
            ) -> list[Prediction]:
    """Labels and class probabilities from a fine-tuned classifier folder, for `texts` and
    the texts of `file`. A completion model is an error that points at `minigpt sample`."""
    check_count("batch_size", batch_size, 1, "it counts texts per forward pass")
    model, tokenizer, meta, labels = load_finetuned(model_dir)
    if meta.task != "classify":
        raise ValueError(f"{model_dir} is a completion model; generate with "
                         f"`minigpt sample --model {model_dir} --prompt ...`")
    texts = list(texts) + (read_texts(file, text_column, encoding) if file is not None else [])
    if not texts:
        raise ValueError("no texts given: pass texts or a file")
    model.to(device)
    rows = [LabeledText(t, labels.labels[0], i + 1) for i, t in enumerate(texts)]
    examples = encode_classification(tokenizer, rows, labels, meta.max_length or model.config.block_size)
    probs = classify(model, examples, batch_size, pad_id=tokenizer.eos_id or 0)
    return [Prediction(t, labels.labels[int(p.argmax())], {l: float(v) for l, v in zip(labels.labels, p)})
            for t, p in zip(texts, probs)]
