"""One fine-tuning run per task: its data read and split, its examples, batches, loss and
evaluations, ready for the shared training loop (`minigpt.train.loop.train`).

- classify: read a labeled file, map labels to ids, split off a stratified validation set
  when none is given, wrap the model in a `GPTClassifier`, cross-entropy (class-weighted
  if asked), and report val_accuracy / val_macro_f1 at each evaluation;
- completion: read prompt/completion pairs, mask prompt tokens out of the loss, append
  eos, pad or pack the rows;
- classify --as-completion: labeled rows become prompt/label-word pairs and train through
  the completion path; scored by label log-likelihood and greedy exact match
  (`minigpt.finetune.as_completion`).

A new task writes a `<task>_run` here and names it in `TASK_RUNS`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.finetune.classifier import ClassificationLoss, GPTClassifier, balanced_class_weights
from minigpt.finetune.config import FinetuneConfig
from minigpt.finetune.data import (
    IGNORE_INDEX, LabeledText, LabelMap, PromptCompletion, ShuffledBatches, collate_classification,
    collate_completion, encode_classification, encode_completions, fixed_batches, pack_completions, read_labeled,
    read_prompt_completion, report_leakage, split_without_leakage,
)
from minigpt.finetune.export import FinetuneMeta
from minigpt.finetune.metrics import classification_report
from minigpt.model import GPT
from minigpt.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TaskRun:
    """Everything the loop needs for one task, plus what the final evaluation needs."""

    model: nn.Module
    train_batches: ShuffledBatches
    eval_batches: Callable[[], Iterable[dict]]
    loss_fn: Callable
    extra_eval: Callable[[nn.Module], dict[str, float]] | None
    meta: FinetuneMeta
    labels: LabelMap | None = None
    evaluate: Callable[[nn.Module], Any] = lambda model: None
    details: dict = field(default_factory=dict)


def _batches(examples, train_config: TrainConfig, collate) -> ShuffledBatches:
    """Shuffled batches of this rank's share (the run's process group is joined by `finetune`;
    the ranks of a tensor-parallel group share one)."""
    from minigpt.train import distributed as dist_

    share = dist_.current().with_tp(train_config.tp)
    return ShuffledBatches(examples, train_config.batch_size, collate, train_config.seed, share.dp_rank, share.dp_size)


def _labeled_split(config: FinetuneConfig) -> tuple[list[LabeledText], list[LabeledText], LabelMap, int]:
    """(training rows, validation rows, labels, validation rows also in training) of a
    labeled task: the validation file, else a stratified split that keeps repeats together."""

    def read(path: str, known: tuple[str, ...] = ()) -> list:
        return read_labeled(path, config.text_column, config.label_column, encoding=config.encoding,
                            merge_label_case=config.merge_label_case, known_labels=known)

    rows = read(config.train_file)
    leaks = 0
    if config.val_file is not None:
        val_rows = read(config.val_file, tuple(sorted({r.label for r in rows})))
        leaks = report_leakage(rows, val_rows, lambda r: r.text, config.train_file, config.val_file, "text")
    else:
        rows, val_rows = split_without_leakage(rows, config.val_fraction, config.split_seed, config.train_file)
        log.info("no validation file: held out %d of %d rows (stratified, seed %d)",
                 len(val_rows), len(rows) + len(val_rows), config.split_seed)
    labels = LabelMap.from_examples(rows)
    unseen = sorted({r.label for r in val_rows} - set(labels.labels))
    if unseen:
        raise ValueError(f"validation labels {unseen} never occur in the training data {config.train_file} "
                         f"(its labels: {list(labels.labels)})")
    return rows, val_rows, labels, leaks


def classify_run(config: FinetuneConfig, backbone: GPT, tokenizer, train_config: TrainConfig) -> TaskRun:
    from minigpt.finetune.evaluate import classify, evaluate_classifier

    rows, val_rows, labels, leaks = _labeled_split(config)
    max_length = min(config.max_length or backbone.config.block_size, backbone.config.block_size)
    pad = tokenizer.eos_id or 0
    train_examples = encode_classification(tokenizer, rows, labels, max_length, config.train_file)
    val_examples = encode_classification(tokenizer, val_rows, labels, max_length, config.val_file or config.train_file)
    weights = None
    if config.class_weights == "balanced":
        weights = balanced_class_weights([e.label for e in train_examples], len(labels))
        log.info("class weights: %s", dict(zip(labels.labels, (round(w, 3) for w in weights))))

    def collate(examples):
        return collate_classification(examples, pad)

    def extra_eval(model: nn.Module) -> dict[str, float]:
        predicted = classify(model, val_examples, config.eval_batch_size, pad).argmax(-1).tolist()
        report = classification_report([e.label for e in val_examples], predicted, labels.labels)
        return {"val_accuracy": report.accuracy, "val_macro_f1": report.macro_f1}

    counts = {label: sum(r.label == label for r in rows) for label in labels.labels}
    return TaskRun(
        model=GPTClassifier(backbone, len(labels)),
        train_batches=_batches(train_examples, train_config, collate),
        eval_batches=lambda: fixed_batches(val_examples, config.eval_batch_size, collate),
        loss_fn=ClassificationLoss(weights),
        extra_eval=extra_eval,
        meta=FinetuneMeta("classify", max_length=max_length),
        labels=labels,
        evaluate=lambda model: evaluate_classifier(model, tokenizer, val_rows, labels, max_length,
                                                   config.eval_batch_size),
        details={"train_rows": len(rows), "val_rows": len(val_rows), "val_rows_in_train": leaks,
                 "train_label_counts": counts,
                 "class_weights": weights},
    )


def _framed(pairs: list[PromptCompletion], config: FinetuneConfig) -> list[PromptCompletion]:
    """Prompts with the bos token before and the separator token after (added tokens are
    recognized in text, so they encode to their own ids)."""
    if not (config.bos or config.sep_token):
        return pairs
    return [PromptCompletion(config.bos + p.prompt + config.sep_token, p.completion, p.line) for p in pairs]


def masked_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`language_model_loss` (mean cross-entropy over targets that are not -100), with the LM
    head applied only at positions that have a target.

    With prompts masked, most positions carry no loss (a classification row has two
    targets, the label word and eos, among ~50 positions), yet the (B, T, V) logits and
    their gradient dominate a small model's step (V = 50257 against n_embd = 32). A
    wrapped model (DDP) or a sharded one (FSDP2 gathers its parameters in its forward's
    hooks; tensor parallelism splits the head) must run through its own forward, so it gets
    the plain loss.
    """
    from minigpt.train.loop import language_model_loss

    if not _runs_its_parts_directly(model):
        return language_model_loss(model, batch)
    targets = batch["targets"]
    x, _, _ = model.hidden(batch["idx"])  # (B, T, C)
    positions = batch.get("target_positions")
    if positions is None:  # a batch not built by `collate_completion`: the mask (a device read)
        keep = targets != IGNORE_INDEX  # (B, T)
        return F.cross_entropy(model.lm_head(x[keep]).float(), targets[keep])
    # The same positions in the same (row-major) order as x[keep], with no device read.
    logits = model.lm_head(x.flatten(0, 1).index_select(0, positions))  # (N, V)
    return F.cross_entropy(logits.float(), targets.flatten().index_select(0, positions))


def _lm_head_positions(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Positions at which `masked_lm_loss` runs the LM head, for MFU (on the loader's CPU batch)."""
    targets = batch["targets"]
    if not _runs_its_parts_directly(model):
        return targets.numel()
    positions = batch.get("target_positions")
    return len(positions) if positions is not None else int((targets != IGNORE_INDEX).sum())


masked_lm_loss.lm_head_positions = _lm_head_positions


def _runs_its_parts_directly(model: nn.Module) -> bool:
    """Whether `masked_lm_loss` may call `model.hidden` and `model.lm_head` itself: a GPT
    whose parameters are whole tensors on this rank (not DTensors of FSDP2 or tensor parallelism)."""
    return isinstance(model, GPT) and not hasattr(model.lm_head.weight, "device_mesh")


def completion_run(config: FinetuneConfig, backbone: GPT, tokenizer, train_config: TrainConfig,
                    pairs: list[PromptCompletion] | None = None,
                    val_pairs: list[PromptCompletion] | None = None) -> TaskRun:
    """A completion run on config's files, or on `pairs`/`val_pairs` when given (already framed)."""
    from minigpt.finetune.evaluate import evaluate_completion
    from minigpt.finetune.check import common_suffix

    def read(path: str) -> list:
        return read_prompt_completion(path, config.prompt_column, config.completion_column, config.encoding)

    leaks = 0
    if pairs is None:
        pairs = read(config.train_file)
        if config.val_file is not None:
            val_pairs = read(config.val_file)
            leaks = report_leakage(pairs, val_pairs, lambda p: p.prompt, config.train_file, config.val_file,
                                   "prompt")
        else:
            pairs, val_pairs = split_without_leakage(pairs, config.val_fraction, config.split_seed,
                                                     config.train_file, key=lambda p: 0, group=lambda p: p.prompt,
                                                     what="prompt")
            log.info("no validation file: held out %d of %d pairs", len(val_pairs), len(pairs) + len(val_pairs))
        pairs, val_pairs = _framed(pairs, config), _framed(val_pairs, config)
    block_size = backbone.config.block_size
    train_examples = encode_completions(tokenizer, pairs, block_size, config.add_eos, config.train_file)
    val_examples = encode_completions(tokenizer, val_pairs, block_size, config.add_eos,
                                      config.val_file or config.train_file)
    if config.packing:
        rows = pack_completions(train_examples, block_size, config.split_seed)
        log.info("packed %d examples into %d rows of up to %d tokens", len(train_examples), len(rows), block_size + 1)
        train_examples = rows
    pad = getattr(tokenizer, "pad_id", None)
    pad = pad if pad is not None else tokenizer.eos_id or 0

    def collate(examples):
        return collate_completion(examples, pad)

    separator = common_suffix([p.prompt for p in pairs])
    stop = common_suffix([p.completion for p in pairs])
    return TaskRun(
        model=backbone,
        train_batches=_batches(train_examples, train_config, collate),
        eval_batches=lambda: fixed_batches(val_examples, config.eval_batch_size, collate),
        loss_fn=masked_lm_loss,
        extra_eval=None,
        meta=FinetuneMeta("completion", separator=separator, stop=stop, bos=config.bos),
        evaluate=lambda model: evaluate_completion(model, tokenizer, val_pairs, stop=stop,
                                                   max_generate=config.max_generate,
                                                   batch_size=config.eval_batch_size, add_eos=config.add_eos),
        details={"train_pairs": len(pairs), "val_pairs": len(val_pairs), "val_pairs_in_train": leaks,
                 "packed_rows": len(train_examples)
                 if config.packing else None},
    )


def as_completion_run(config: FinetuneConfig, backbone: GPT, tokenizer, train_config: TrainConfig) -> TaskRun:
    """Labeled rows taught as completion: the classify task's data, the completion run's
    training, and evaluation by label log-likelihood and greedy exact match."""
    from minigpt.finetune.as_completion import evaluate_as_completion, labeled_to_pairs, likelihood_predictions
    from minigpt.finetune.fewshot import FewShotPrompt

    rows, val_rows, labels, leaks = _labeled_split(config)
    prompt = FewShotPrompt(template=config.bos + config.template + config.sep_token, label_prefix=config.label_prefix)
    pairs = labeled_to_pairs(rows, prompt, tokenizer, config.max_length)
    val_pairs = labeled_to_pairs(val_rows, prompt, tokenizer, config.max_length)
    # The texts as the model sees them (cut to max_length), for scoring.
    val_texts = [LabeledText(_text_of(p, prompt), r.label, r.line) for p, r in zip(val_pairs, val_rows)]
    run = completion_run(config, backbone, tokenizer, train_config, pairs, val_pairs)

    def extra_eval(model: nn.Module) -> dict[str, float]:
        predicted = likelihood_predictions(model, tokenizer, [r.text for r in val_texts], labels, prompt)
        report = classification_report([labels.id(r.label) for r in val_texts], predicted, labels.labels)
        return {"val_accuracy": report.accuracy, "val_macro_f1": report.macro_f1}

    run.extra_eval = extra_eval
    run.evaluate = lambda model: evaluate_as_completion(model, tokenizer, val_texts, labels, prompt,
                                                        config.eval_batch_size)
    run.details.update(labels=list(labels.labels), template=prompt.template, label_prefix=prompt.label_prefix,
                       val_rows_in_train=leaks)
    return run


def _text_of(pair: PromptCompletion, prompt) -> str:
    """The text a rendered prompt was made from (the template's prefix and suffix removed)."""
    before, _, after = prompt.template.partition("{text}")
    return pair.prompt[len(before) : len(pair.prompt) - len(after)]


def build_run(config: FinetuneConfig, backbone: GPT, tokenizer, train_config: TrainConfig) -> TaskRun:
    """The run of `config.task` (a classifier taught as completion has its own)."""
    if config.as_completion:
        return as_completion_run(config, backbone, tokenizer, train_config)
    return TASK_RUNS[config.task](config, backbone, tokenizer, train_config)


TASK_RUNS: dict[str, Callable[[FinetuneConfig, GPT, Any, TrainConfig], TaskRun]] = {
    "classify": classify_run,
    "completion": completion_run,
}
"""Task name (`minigpt.finetune.config.TASKS`) -> the function that sets its run up."""
