"""Classification taught as completion: the label word is the completion of a prompt.

Each labeled row becomes a prompt/completion pair through the few-shot template,

    prompt:      "Review: a gem of a film\\nSentiment:"
    completion:  " positive"            (then eos)

and the model trains as a language model on it with the prompt masked, through the same
completion path as any prompt/completion data. There is no new head: the label is read
back by comparing the log-likelihood of each label word after the prompt (the few-shot
scorer with k = 0), or by generating greedily and checking the words match (exact match;
a completion that is no label counts as wrong). Radford et al. 2019 and Brown et al. 2020
read tasks this way from a language model; fine-tuning on the format teaches it to answer.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn as nn

from minigpt.finetune.classify import LabeledText, labeled_split
from minigpt.finetune.completion import PromptCompletion, completion_batches, language_model_run
from minigpt.finetune.config import AsCompletionData
from minigpt.finetune.data import LabelMap
from minigpt.finetune.fewshot import FewShotClassifier, FewShotPrompt
from minigpt.finetune.metrics import ClassificationReport, classification_report
from minigpt.finetune.task import RunStart, TaskRun
from minigpt.progress import progress_bar

log = logging.getLogger(__name__)


def labeled_to_pairs(rows: Sequence[LabeledText], prompt: FewShotPrompt, tokenizer=None,
                     max_length: int | None = None) -> list[PromptCompletion]:
    """One (template(text), label_prefix + label word) pair per row, keeping the row's line.

    With `max_length`, each text is cut to its first max_length tokens first (as the
    classification head's texts are), so prompts fit the context; the count is logged.
    """
    out, cut = [], 0
    for r in rows:
        text = r.text
        if max_length is not None:
            ids = tokenizer.encode(text)
            if len(ids) > max_length:
                text, cut = tokenizer.decode(ids[:max_length]), cut + 1
        out.append(PromptCompletion(prompt.template.format(text=text), prompt.label_prefix + prompt.word(r.label),
                                    r.line))
    if cut:
        log.info("%d of %d texts cut to their first %d tokens", cut, len(rows), max_length)
    return out


@dataclass
class AsCompletionReport:
    """A completion-trained classifier's scores on labeled rows."""

    likelihood: ClassificationReport
    """Labels chosen by label-word log-likelihood after the prompt (the few-shot scorer, k = 0)."""
    exact_match: float
    """Share of greedy completions equal to the row's label word (whitespace-trimmed)."""
    not_a_label: int
    """Greedy completions that are no label word at all."""

    @property
    def accuracy(self) -> float:
        return self.likelihood.accuracy

    @property
    def classification(self) -> ClassificationReport:
        """The report's classification (its confusion matrix is drawn by `write_report`)."""
        return self.likelihood

    def to_dict(self) -> dict:
        return {**self.likelihood.to_dict(), "exact_match": self.exact_match, "not_a_label": self.not_a_label,
                "scored_by": "label log-likelihood"}

    def format(self) -> str:
        return (f"labels scored by log-likelihood:\n{self.likelihood.format()}\n"
                f"greedy completion exact match {self.exact_match:.4f} "
                f"({self.not_a_label} of {self.likelihood.n} completions are no label)")


def likelihood_predictions(model: nn.Module, tokenizer, texts: Sequence[str], labels: LabelMap,
                           prompt: FewShotPrompt) -> list[int]:
    """Label id with the highest label-word log-likelihood after each text's prompt."""

    scorer = FewShotClassifier(model, tokenizer, labels.labels, shots=(), prompt=prompt)
    return [scorer.predict(t) for t in progress_bar(texts, len(texts), "score", unit="text")]


def evaluate_as_completion(model: nn.Module, tokenizer, rows: Sequence[LabeledText], labels: LabelMap,
                           prompt: FewShotPrompt, batch_size: int = 32) -> AsCompletionReport:
    """Accuracy etc. by label log-likelihood, and exact match of greedy completions.

    rows' texts are used as given (cut them as in training); the prompt must be the one
    the model was trained with (including any bos or separator token in its template).
    """
    from minigpt.generate import generate_text

    texts = [r.text for r in rows]
    truth = [labels.id(r.label) for r in rows]
    report = classification_report(truth, likelihood_predictions(model, tokenizer, texts, labels, prompt),
                                   labels.labels)
    words = [prompt.word(label).strip() for label in labels.labels]
    budget = max(len(tokenizer.encode(prompt.label_prefix + prompt.word(label))) for label in labels.labels) + 1
    hits = strays = 0
    was_training = model.training
    model.eval()
    try:
        for i in progress_bar(range(0, len(rows), batch_size), -(-len(rows) // batch_size), "generate"):
            prompts = [prompt.template.format(text=t) for t in texts[i : i + batch_size]]
            outputs = generate_text(model, tokenizer, prompts, budget, temperature=0)
            for out, label in zip(outputs, truth[i : i + batch_size]):
                hits += out.strip() == words[label]
                strays += out.strip() not in words
    finally:
        model.train(was_training)
    return AsCompletionReport(report, hits / len(rows), strays)


def is_as_completion(details: dict) -> bool:
    """Whether a fine-tuned folder's finetune.json details describe a classifier taught as completion."""
    return bool(details.get("finetune", {}).get("as_completion")) and "template" in details


def evaluate_saved(model: nn.Module, tokenizer, details: dict, rows: Sequence[LabeledText],
                   batch_size: int = 32) -> AsCompletionReport:
    """Evaluate a saved as-completion model on labeled rows with its recorded template,
    label prefix, labels and text cut (max_length)."""
    labels = LabelMap(tuple(details["labels"]))
    prompt = FewShotPrompt(template=details["template"], label_prefix=details["label_prefix"])
    max_length = details["finetune"].get("max_length")
    unknown = sorted({r.label for r in rows} - set(labels.labels))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the model's {list(labels.labels)}")
    pairs = labeled_to_pairs(rows, FewShotPrompt(template="{text}", label_prefix=""), tokenizer, max_length)
    cut = [LabeledText(p.prompt, r.label, r.line) for p, r in zip(pairs, rows)]
    return evaluate_as_completion(model, tokenizer, cut, labels, prompt, batch_size)


def as_completion_run(data: AsCompletionData, start: RunStart) -> TaskRun:
    """Labeled rows taught as completion: the classify task's rows, the completion task's
    training, and evaluation by label log-likelihood and greedy exact match."""
    rows, val_rows, labels, leaks = labeled_split(data.rows)
    tokenizer, tokens = start.tokenizer, start.tokens
    prompt = FewShotPrompt(template=tokens.frame(data.template), label_prefix=data.label_prefix)
    pairs = labeled_to_pairs(rows, prompt, tokenizer, data.rows.max_length)
    val_pairs = labeled_to_pairs(val_rows, prompt, tokenizer, data.rows.max_length)
    # The texts as the model sees them (cut to max_length), for scoring.
    val_texts = [LabeledText(_text_of(p, prompt), r.label, r.line) for p, r in zip(val_pairs, val_rows)]
    batches = completion_batches(pairs, val_pairs, start, data.rows.files, data.packing, data.add_eos)

    def extra_eval(model: nn.Module) -> dict[str, float]:
        predicted = likelihood_predictions(model, tokenizer, [r.text for r in val_texts], labels, prompt)
        report = classification_report([labels.id(r.label) for r in val_texts], predicted, labels.labels)
        return {"val_accuracy": report.accuracy, "val_macro_f1": report.macro_f1}

    def evaluate(model: nn.Module) -> AsCompletionReport:
        return evaluate_as_completion(model, tokenizer, val_texts, labels, prompt, start.eval_batch_size)

    details = {"val_pairs_in_train": 0, "labels": list(labels.labels), "template": prompt.template,
               "label_prefix": prompt.label_prefix, "val_rows_in_train": leaks}
    return language_model_run(batches, start, details, evaluate, extra_eval)


def _text_of(pair: PromptCompletion, prompt: FewShotPrompt) -> str:
    """The text a rendered prompt was made from (the template's prefix and suffix removed)."""
    before, _, after = prompt.template.partition("{text}")
    return pair.prompt[len(before) : len(pair.prompt) - len(after)]
