"""Evaluate fine-tuned models and few-shot prompting on labeled files; predict labels.

Classifiers get accuracy, per-class and macro precision/recall/F1, the confusion matrix
(as text and PNG) and the majority-class baseline beside them. Completion models get the
loss over completion tokens (the training objective, averaged per token), its perplexity,
and exact match of greedy completions on held-out prompts. Classifiers taught as completion
(`minigpt.finetune.as_completion`) get the classifier's report, labels scored by likelihood.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from minigpt.finetune.as_completion import evaluate_saved, is_as_completion
from minigpt.finetune.classifier import GPTClassifier, predict_proba
from minigpt.finetune.data import (
    IGNORE_INDEX, ClassificationExample, LabeledText, LabelMap, PromptCompletion, collate_classification,
    collate_completion, encode_classification, encode_completions, fixed_batches, read_labeled,
    read_prompt_completion,
)
from minigpt.finetune.export import load_finetuned
from minigpt.evaluation.harness import evaluate_examples
from minigpt.evaluation.tasks import Task
from minigpt.finetune.fewshot import FewShotPrompt, as_multiple_choice, choose, prompt_format, select_shots
from minigpt.finetune.metrics import ClassificationReport, classification_report, write_report
from minigpt.progress import progress_bar
from minigpt.typed import check_count

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ classification
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


# ---------------------------------------------------------------------------- completion
@dataclass
class CompletionReport:
    loss: float
    """Mean cross-entropy per completion token (eos included), nats."""
    perplexity: float
    tokens: int
    """Completion tokens the loss averages over."""
    exact_match: float | None = None
    """Fraction of greedy completions equal to the reference (whitespace-trimmed, stop cut)."""
    generated: int = 0
    samples: list[dict] = field(default_factory=list)
    """A few (prompt, reference, generated) triples to read."""

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        lines = [f"completion loss {self.loss:.4f} nats/token over {self.tokens} tokens, "
                 f"perplexity {self.perplexity:.2f}"]
        if self.exact_match is not None:
            lines.append(f"exact match {self.exact_match:.3f} on {self.generated} greedy completions")
        for s in self.samples:
            lines += ["", f"prompt:    {s['prompt']!r}", f"reference: {s['reference']!r}", f"generated: {s['generated']!r}"]
        return "\n".join(lines)


@torch.no_grad()
def completion_loss(model, tokenizer, pairs: Sequence[PromptCompletion], batch_size: int = 16,
                    add_eos: bool = True) -> tuple[float, int]:
    """(mean loss per completion token, number of tokens), prompt tokens excluded."""
    examples = encode_completions(tokenizer, pairs, model.config.block_size, add_eos)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        batches = fixed_batches(examples, batch_size, lambda xs: collate_completion(xs, tokenizer.eos_id or 0))
        for batch in progress_bar(batches, math.ceil(len(examples) / batch_size), "loss"):
            idx, targets = batch["idx"].to(device), batch["targets"].to(device)
            logits = model(idx).logits  # (B, T, V)
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / count, count


def evaluate_completion(model, tokenizer, pairs: Sequence[PromptCompletion], *, stop: str = "",
                        max_generate: int = 100, batch_size: int = 16, samples: int = 3,
                        add_eos: bool = True) -> CompletionReport:
    """Loss/perplexity on every pair, and exact match of greedy completions on the first
    `max_generate` pairs (generation is the slow part; 0 skips it)."""
    from minigpt.generate import generate_text

    loss, tokens = completion_loss(model, tokenizer, pairs, batch_size, add_eos)
    report = CompletionReport(loss, math.exp(min(loss, 80.0)), tokens)
    chosen = list(pairs[:max_generate])
    if not chosen:
        return report
    stops = [stop] if stop else []
    hits = 0
    for i in progress_bar(range(0, len(chosen), batch_size), math.ceil(len(chosen) / batch_size), "generate"):
        part = chosen[i : i + batch_size]
        budget = max(len(tokenizer.encode(p.completion)) for p in part) + 4
        budget = min(budget, model.config.block_size - max(len(tokenizer.encode(p.prompt)) for p in part))
        outputs = generate_text(model, tokenizer, [p.prompt for p in part], max(budget, 1), stop=stops, temperature=0)
        for p, out in zip(part, outputs):
            reference = p.completion[: -len(stop)] if stop and p.completion.endswith(stop) else p.completion
            hits += out.strip() == reference.strip()
            if len(report.samples) < samples:
                report.samples.append({"prompt": p.prompt, "reference": reference, "generated": out})
    report.exact_match = hits / len(chosen)
    report.generated = len(chosen)
    return report


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
