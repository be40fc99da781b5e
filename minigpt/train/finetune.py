"""Fine-tuning entry point: set a run up, then hand it to the shared training loop.

Pretraining and fine-tuning share `minigpt.train.loop.train` (optimizer, schedule,
checkpoints, resume, logging, early stopping); this module only differs in setup:

- classify: read a labeled file, map labels to ids, split off a stratified validation set
  when none is given, wrap the model in a `GPTClassifier`, cross-entropy (class-weighted
  if asked), and report val_accuracy / val_macro_f1 at each evaluation;
- completion: read prompt/completion pairs, mask prompt tokens out of the loss, append
  eos, pad or pack the rows; named bos/pad/separator tokens are added to the tokenizer
  and the model (`minigpt.vocab.add_tokens`) when new;
- classify --as-completion: labeled rows become prompt/label-word pairs and train through
  the completion path; scored by label log-likelihood and greedy exact match
  (`minigpt.finetune.as_completion`);
- either: freeze all but the last N blocks (and the head), or train LoRA adapters only.

The best checkpoint (by `TrainConfig.best_metric`) is exported to OUT/model as a
fine-tuned folder (LoRA merged, see `minigpt.finetune.export`) and evaluated on the
validation data into OUT/eval.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.config import reject_unknown_keys
from minigpt.finetune.classifier import ClassificationLoss, GPTClassifier, balanced_class_weights
from minigpt.finetune.data import (
    IGNORE_INDEX, LabeledText, LabelMap, PromptCompletion, ShuffledBatches, collate_classification,
    collate_completion, encode_classification, encode_completions, fixed_batches, pack_completions, read_labeled,
    read_prompt_completion, report_leakage, split_without_leakage,
)
from minigpt.finetune.export import FinetuneMeta, save_finetuned
from minigpt.finetune.lora import LORA_TARGETS, apply_lora, count_trainable, freeze_all_but_last
from minigpt.finetune.metrics import classification_report
from minigpt.model import GPT
from minigpt.tokenizer import GPT2_EOS
from minigpt.train.loop import TrainConfig, train
from minigpt.typed import PathStr, check_fields, field_types, parse_cli

log = logging.getLogger(__name__)

TASKS = ("classify", "completion")
CLASS_WEIGHTS = ("none", "balanced")


@dataclass(frozen=True)
class FinetuneConfig:
    """What to fine-tune, on what, and which parameters train; `TrainConfig` says how."""

    task: str
    """"classify" (a head on the last token) or "completion" (prompt -> completion)."""
    train_file: PathStr
    """CSV, TSV, JSON array or JSONL: classify: a text and a label column; completion: a prompt
    and a completion column."""
    init: PathStr | None = None
    """What to start from (see `minigpt.model_dir`): a model folder (Hugging Face GPT-2/GPT-Neo
    layout or minigpt's), a training or fine-tuning run folder, or a preset name (e.g. tiny-bpe,
    gpt2) for a fresh random model; None when the model is passed to `finetune` directly."""
    val_file: PathStr | None = None
    """Validation data; None splits val_fraction off the training file (stratified by label,
    duplicates kept on one side). Rows that also occur in the training file are reported."""
    val_fraction: float = 0.1
    """Share of the training file held out when no val_file is given."""
    split_seed: int = 1337
    """Seed of that split (and of packing's order)."""
    text_column: str = "text"
    """classify: column (or JSON field) holding the text."""
    label_column: str = "label"
    """classify: column (or JSON field) holding the label."""
    merge_label_case: bool = False
    """classify: treat labels that differ only by case or surrounding whitespace as one class
    (the most frequent spelling); False makes them an error that lists the spellings."""
    prompt_column: str = "prompt"
    """completion: column (or JSON field) holding the prompt."""
    completion_column: str = "completion"
    """completion: column (or JSON field) holding the completion."""
    encoding: str = "utf-8"
    """Text encoding of the data files (a UTF-8 byte-order mark is always dropped)."""
    max_length: int | None = None
    """classify: tokens kept per text (its first ones); None means the model's block_size."""
    class_weights: str = "none"
    """classify: "none", or "balanced" (n / (classes * count) per class, for skewed labels)."""
    packing: bool = False
    """completion: pack several examples per row instead of padding each to the batch's longest."""
    add_eos: bool = True
    """completion: append the tokenizer's eos to every completion, so generation learns to stop."""
    train_last_blocks: int | None = None
    """Train only the last N blocks (+ final LayerNorm and head); 0 is the head alone; None trains all."""
    lora_rank: int = 0
    """LoRA rank r; 0 disables LoRA. With LoRA only the adapters (and a classifier's head) train."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the update is (alpha / r) B A."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input."""
    lora_targets: tuple[str, ...] = LORA_TARGETS
    """Projections in each block that get adapters."""
    eval_batch_size: int = 32
    """Batch size of validation passes."""
    max_generate: int = 50
    """completion: held-out prompts completed greedily for exact match in the final report."""
    bos: str = ""
    """completion: special token put before every prompt, e.g. "<|startoftext|>" (added if new)."""
    pad_token: str = ""
    """completion: special token to pad batches with, e.g. "<|pad|>" (added if new); "" pads with eos."""
    sep_token: str = ""
    """completion: special token put after every prompt, e.g. "<|sep|>" (added if new)."""
    as_completion: bool = False
    """classify: teach the label word as the completion of `template` instead of training a head."""
    template: str = "Review: {text}\nSentiment:"
    """classify with as_completion: the prompt of each row; must contain {text}."""
    label_prefix: str = " "
    """classify with as_completion: put between the prompt and the label word."""

    def __post_init__(self) -> None:
        check_fields(self)  # every value has its field's type (minigpt.typed)
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} must be one of {TASKS}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ValueError(f"class_weights={self.class_weights!r} must be one of {CLASS_WEIGHTS}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 1)")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank} must be >= 0 (0 disables LoRA)")
        if self.lora_rank and self.train_last_blocks is not None:
            raise ValueError("choose LoRA (lora_rank > 0) or train_last_blocks, not both")
        if self.train_last_blocks is not None and self.train_last_blocks < 0:
            raise ValueError(f"train_last_blocks={self.train_last_blocks} must be >= 0 or None (train all)")
        if self.as_completion and self.task != "classify":
            raise ValueError("as_completion=True applies to task='classify' (a labeled file taught as completion)")
        if self.as_completion and "{text}" not in self.template:
            raise ValueError(f"template={self.template!r} must contain {{text}}, where each row's text goes")
        for name in ("bos", "sep_token"):
            if getattr(self, name) == GPT2_EOS:
                raise ValueError(f"{name}={GPT2_EOS!r} is GPT-2's eos, which prompts read as plain text; "
                                 f"name a new token such as '<|startoftext|>' or '<|sep|>' (it is added)")
        if self.uses_completion_path and self.train_last_blocks == 0:
            raise ValueError("train_last_blocks=0 leaves a completion model nothing to train (its head is "
                             "tied to the embedding); use 1 or more, or LoRA")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length={self.max_length} must be >= 1 or None (block_size)")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size={self.eval_batch_size} must be >= 1")
        if self.max_generate < 0:
            raise ValueError(f"max_generate={self.max_generate} must be >= 0 (0 skips exact match)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        if self.lora_rank and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha={self.lora_alpha} must be > 0")
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if unknown or not self.lora_targets:
            raise ValueError(f"lora_targets={list(self.lora_targets)} must be some of {list(LORA_TARGETS)}")

    @property
    def uses_completion_path(self) -> bool:
        """Trains as a language model with the prompt masked (completion, or classify as completion)."""
        return self.task == "completion" or self.as_completion

    @property
    def special_tokens(self) -> list[str]:
        """The bos, separator and pad tokens named, in that order."""
        return [t for t in (self.bos, self.sep_token, self.pad_token) if t]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FinetuneConfig":
        """Build from a plain dict; unknown keys are an error that lists the valid ones."""
        reject_unknown_keys(cls, values)
        return cls(**values)


@dataclass
class FinetuneResult:
    model_dir: Path
    """The exported best model (a fine-tuned folder)."""
    report: Any
    """Its evaluation on the validation data (ClassificationReport or CompletionReport)."""
    train_result: Any
    """What the training loop returned."""
    trainable_params: int = 0
    total_params: int = 0


@dataclass
class _Run:
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


def _start_model(config: FinetuneConfig, model: GPT | None, tokenizer, backend: str, seed: int) -> tuple[GPT, object]:
    from minigpt.model_dir import start_model
    from minigpt.tokenizer import Tokenizer

    if model is not None:
        return model, tokenizer if tokenizer is not None else Tokenizer()
    if config.init is None:
        raise ValueError("say where to start: FinetuneConfig.init (--init) names a model or run folder, or a "
                         "preset for a fresh random model")
    backbone, saved = start_model(config.init, backend=backend, seed=seed)
    return backbone, tokenizer or saved


def _batches(examples, batch_size: int, collate, seed: int, device: str) -> ShuffledBatches:
    from minigpt.train import distributed as dist_

    info = dist_.setup(device)
    return ShuffledBatches(examples, batch_size, collate, seed, info.rank, info.world_size)


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


def _classify_run(config: FinetuneConfig, backbone: GPT, tokenizer, train_config: TrainConfig) -> _Run:
    from minigpt.finetune.evaluate import classify, evaluate_classifier

    rows, val_rows, labels, leaks = _labeled_split(config)
    max_length = min(config.max_length or backbone.config.block_size, backbone.config.block_size)
    pad = tokenizer.eos_id or 0
    train_examples = encode_classification(tokenizer, rows, labels, max_length)
    val_examples = encode_classification(tokenizer, val_rows, labels, max_length)
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
    return _Run(
        model=GPTClassifier(backbone, len(labels)),
        train_batches=_batches(train_examples, train_config.batch_size, collate, train_config.seed,
                               train_config.device),
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


def _add_special_tokens(config: FinetuneConfig, backbone: GPT, tokenizer) -> None:
    """Add the bos/separator/pad tokens the config names to the tokenizer and the model,
    growing the embedding when they are new (logged once, by `add_tokens`)."""
    from minigpt.tokenizer import Tokenizer
    from minigpt.vocab import add_tokens

    tokens = config.special_tokens
    if not tokens:
        return
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError(f"special tokens {tokens} need GPT-2's tokenizer; this model's is "
                         f"{type(tokenizer).__name__}")
    new = add_tokens(backbone, tokenizer, tokens)
    if not new:
        log.info("special tokens %s are already in the vocabulary", tokens)
    if config.pad_token:
        tokenizer.set_pad_token(config.pad_token)


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
    wrapped model (DDP, compile) must run through its own forward, so it gets the plain loss.
    """
    from minigpt.train.loop import language_model_loss

    if not isinstance(model, GPT):
        return language_model_loss(model, batch)
    targets = batch["targets"]
    keep = targets != IGNORE_INDEX  # (B, T)
    x, _, _ = model.hidden(batch["idx"])  # (B, T, C)
    logits = model.lm_head(x[keep])  # (N, V)
    return F.cross_entropy(logits.float(), targets[keep])


def _lm_head_positions(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Positions at which `masked_lm_loss` runs the LM head, for MFU (on the loader's CPU batch)."""
    targets = batch["targets"]
    return int((targets != IGNORE_INDEX).sum()) if isinstance(model, GPT) else targets.numel()


masked_lm_loss.lm_head_positions = _lm_head_positions


def _completion_run(config: FinetuneConfig, backbone: GPT, tokenizer, train_config: TrainConfig,
                    pairs: list[PromptCompletion] | None = None,
                    val_pairs: list[PromptCompletion] | None = None) -> _Run:
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
    train_examples = encode_completions(tokenizer, pairs, block_size, config.add_eos)
    val_examples = encode_completions(tokenizer, val_pairs, block_size, config.add_eos)
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
    return _Run(
        model=backbone,
        train_batches=_batches(train_examples, train_config.batch_size, collate, train_config.seed,
                               train_config.device),
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


def _as_completion_run(config: FinetuneConfig, backbone: GPT, tokenizer, train_config: TrainConfig) -> _Run:
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
    run = _completion_run(config, backbone, tokenizer, train_config, pairs, val_pairs)

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


def prepare(config: FinetuneConfig, train_config: TrainConfig, *, model: GPT | None = None,
            tokenizer=None) -> tuple[_Run, object]:
    """Build the model, data and hooks of a run without training (for inspection and tests)."""
    from minigpt.device import check_device

    check_device(train_config.device)
    backbone, tokenizer = _start_model(config, model, tokenizer, train_config.backend, train_config.seed)
    _add_special_tokens(config, backbone, tokenizer)
    torch.manual_seed(train_config.seed)  # the new head and adapters start the same for a seed
    if config.as_completion:
        build = _as_completion_run
    else:
        build = _classify_run if config.task == "classify" else _completion_run
    run = build(config, backbone, tokenizer, train_config)
    head = () if config.uses_completion_path else ("score.",)
    if config.lora_rank:
        apply_lora(run.model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets,
                   trainable=head)
    elif config.train_last_blocks is not None:
        freeze_all_but_last(run.model, config.train_last_blocks, trainable=head)
    trainable, total = count_trainable(run.model), sum(p.numel() for p in run.model.parameters())
    log.info("training %s of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    run.details.update(trainable_params=trainable, total_params=total)
    run.meta = dataclasses.replace(run.meta, details={"finetune": dataclasses.asdict(config), **run.details})
    return run, tokenizer


# Training defaults for fine-tuning: a short run at a small learning rate, evaluated often.
FINETUNE_TRAIN: dict[str, Any] = dict(
    max_steps=1000,
    batch_size=16,
    lr=1e-4,
    min_lr=1e-5,
    warmup_steps=50,
    weight_decay=0.01,
    beta2=0.999,
    eval_interval=100,
    eval_steps=100,
    checkpoint_interval=0,
)
# LoRA's adapters start at zero and are few: they take a larger step (Hu et al. 2021 use 2e-4..1e-3).
LORA_LR = 1e-3


def default_train_config(config: FinetuneConfig, out_dir: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """FINETUNE_TRAIN for this task, then `overrides` (TrainConfig fields, validated).

    Classifiers keep the checkpoint with the best val_accuracy; completion models the one
    with the lowest val_loss. With LoRA the peak lr is LORA_LR. Warm-up is at most a tenth
    of max_steps unless set.
    """
    values: dict[str, Any] = {**FINETUNE_TRAIN, "out_dir": out_dir}
    if config.lora_rank:
        values.update(lr=LORA_LR, min_lr=LORA_LR / 10)
    if config.task == "classify":
        values.update(best_metric="val_accuracy", best_mode="max")
    values.update(overrides or {})
    if "warmup_steps" not in (overrides or {}) and isinstance(values["max_steps"], int):
        values["warmup_steps"] = min(values["warmup_steps"], values["max_steps"] // 10)  # short runs
    return TrainConfig.from_dict(values)


def train_overrides(items: Iterable[str]) -> dict[str, Any]:
    """TrainConfig values from 'key=value' / 'train.key=value' items (dashes allowed in keys);
    each text is converted by its field's type, as in `minigpt train` (`minigpt.typed.parse_cli`).
    Unknown keys are an error listing the valid ones."""
    types = field_types(TrainConfig)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.lstrip("-").partition("=")
        key = key.replace("-", "_").removeprefix("train.")
        reject_unknown_keys(TrainConfig, {key: value})
        if sep:
            out[key] = parse_cli(value, types[key], f"--{key}")
        elif types[key] is bool:
            out[key] = True  # a bare --flag means true
        else:
            raise ValueError(f"--{key} needs a value, e.g. --{key}=... (only true/false keys may be given bare)")
    return out


def finetune(config: FinetuneConfig, train_config: TrainConfig, *, model: GPT | None = None, tokenizer=None,
             resume: bool = False, overwrite: bool = False) -> FinetuneResult:
    """Fine-tune, export the best model to OUT/model and evaluate it into OUT/eval.

    model/tokenizer: start from this GPT instead of `config.init` (e.g. a fresh one).
    Every checkpoint the loop writes is itself a fine-tuned folder (LoRA merged) that
    `minigpt evaluate`/`predict` read; `resume` continues from the newest one that loads.
    OUT must not hold another run unless `resume`, or `overwrite` (which moves it aside).
    Raises ValueError for bad data (naming file and line), inconsistent options, or a run
    folder that is in use or holds another run.
    """
    from minigpt.train import distributed as dist_
    from minigpt.train import runfolder

    run, tokenizer = prepare(config, train_config, model=model, tokenizer=tokenizer)
    out = Path(train_config.out_dir)

    def save_model(model: nn.Module, folder: Path) -> None:
        save_finetuned(model, folder, tokenizer, run.meta, run.labels)

    metadata = {"finetune": dataclasses.asdict(config), "model": run.model.config.to_dict(),
                "labels": list(run.labels.labels) if run.labels else None}
    info = dist_.setup(train_config.device)
    with runfolder.claim(out, resume=resume, overwrite=overwrite, is_main=info.is_main):
        result = train(run.model, train_config, run.train_batches, eval_batches=run.eval_batches,
                       loss_fn=run.loss_fn, extra_eval=run.extra_eval, save_model=save_model, resume=resume,
                       run_metadata=metadata)
        return _export(config, run, result, save_model, out, info)


def _export(config: FinetuneConfig, run: _Run, result, save_model, out: Path, info) -> FinetuneResult:
    """Rank 0: the best checkpoint to OUT/model, evaluated into OUT/eval."""
    from minigpt.train import checkpoint as ckpt

    if not info.is_main:
        return FinetuneResult(out / "model", None, result, run.details["trainable_params"], run.details["total_params"])
    best = result.best_checkpoint or result.last_checkpoint
    weights = best / ckpt.RESUME_MODEL_FILE
    run.model.load_state_dict(ckpt.load_state_dict_file(weights if weights.is_file() else best / ckpt.MODEL_FILE))
    run.model.cpu()
    model_dir = out / "model"
    save_model(run.model, model_dir)
    report = run.evaluate(run.model)
    _write_eval(report, out / "eval", {"model": str(model_dir), "task": config.task, "checkpoint": str(best),
                                       "best_step": result.best_step})
    log.info("best checkpoint %s (step %s) exported to %s; its validation report is in %s",
             best, result.best_step, model_dir, out / "eval")
    return FinetuneResult(model_dir, report, result, run.details["trainable_params"], run.details["total_params"])


def _write_eval(report, folder: Path, extra: dict) -> None:
    from minigpt.finetune.as_completion import AsCompletionReport, write_as_completion_report
    from minigpt.finetune.metrics import ClassificationReport, write_report

    if isinstance(report, ClassificationReport):
        write_report(report, folder, extra)
        return
    if isinstance(report, AsCompletionReport):
        write_as_completion_report(report, folder, extra)
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({**report.to_dict(), **extra}, indent=2) + "\n")
    (folder / "report.txt").write_text(report.format() + "\n")
