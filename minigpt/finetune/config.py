"""What a fine-tuning run is, and the training defaults it starts from.

`FinetuneConfig` is the one spelling a user writes, as flags (`minigpt finetune ...`), as
keys or as keyword arguments: flat, every field one flag. The code reads it through its
typed parts, each built and checked here:

- `data`: the task's own data settings, one type per entry of `TASK_RUNS`
  (`ClassifyData`, `CompletionData`, `AsCompletionData`), each holding the `DataFiles`;
- `adapter`: the LoRA adapters (`LoRAConfig`), or None;
- `tokens`: the special tokens put around prompts (`SpecialTokens`).

`task_run` names the entry of `minigpt.finetune.tasks.TASK_RUNS` that runs it; a new task
adds its data type and `task_run` name here, its module and entry there, and its
subcommand in `minigpt.cli.finetune`. `default_train_config` gives the `TrainConfig`
(a short run at a small learning rate).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from minigpt.config import reject_unknown_keys
from minigpt.finetune.lora import LORA_TARGETS
from minigpt.runconfig import Section, apply_overrides
from minigpt.tokenizer import GPT2_EOS
from minigpt.train.config import TrainConfig
from minigpt.typed import PathStr, check_fields

TASKS = ("classify", "completion")
"""The subcommands, and the task a fine-tuned folder's finetune.json records."""
CLASS_WEIGHTS = ("none", "balanced")


# ------------------------------------------------------------------------ the typed parts
@dataclass(frozen=True)
class DataFiles:
    """Where the rows come from, and how validation rows are found."""

    train_file: str
    """The training file (CSV, TSV, JSON array or JSONL)."""
    val_file: str | None
    """The validation file; None holds out val_fraction of the training file."""
    val_fraction: float
    """Share of the training file held out when no val_file is given."""
    split_seed: int
    """Seed of that split (and of packing's order)."""
    encoding: str
    """Text encoding of both files."""

    @property
    def val_source(self) -> str:
        """The file validation rows come from, named in messages."""
        return self.val_file or self.train_file


@dataclass(frozen=True)
class LabeledData:
    """How labeled rows (a text and a label) are read and cut."""

    files: DataFiles
    """Where they come from."""
    text_column: str
    """Column holding the text."""
    label_column: str
    """Column holding the label."""
    merge_label_case: bool
    """Labels that differ only by case or surrounding whitespace are one class."""
    max_length: int | None
    """Tokens kept per text (its first ones); None means the model's block_size."""

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length={self.max_length} must be >= 1 or None (block_size)")


@dataclass(frozen=True)
class ClassifyData:
    """The classify task: labeled rows, a head on the last token."""

    rows: LabeledData
    """The labeled rows."""
    class_weights: str
    """"none" or "balanced" cross-entropy weights."""

    def __post_init__(self) -> None:
        if self.class_weights not in CLASS_WEIGHTS:
            raise ValueError(f"class_weights={self.class_weights!r} must be one of {CLASS_WEIGHTS}")


@dataclass(frozen=True)
class CompletionData:
    """The completion task: prompt/completion pairs, the prompt masked out of the loss."""

    files: DataFiles
    """Where the pairs come from."""
    prompt_column: str
    """Column holding the prompt."""
    completion_column: str
    """Column holding the completion."""
    packing: bool
    """Pack several examples per row instead of padding each."""
    add_eos: bool
    """Append eos to every completion."""
    max_generate: int
    """Held-out prompts completed greedily for exact match in the final report."""

    def __post_init__(self) -> None:
        if self.max_generate < 0:
            raise ValueError(f"max_generate={self.max_generate} must be >= 0 (0 skips exact match)")


@dataclass(frozen=True)
class AsCompletionData:
    """Classification taught as completion: labeled rows become template/label-word pairs."""

    rows: LabeledData
    """The labeled rows."""
    template: str
    """The prompt of each row; contains {text}."""
    label_prefix: str
    """Put between the prompt and the label word."""
    packing: bool
    """Pack several examples per row instead of padding each."""
    add_eos: bool
    """Append eos to every label word."""

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise ValueError(f"template={self.template!r} must contain {{text}}, where each row's text goes")


TaskData = ClassifyData | CompletionData | AsCompletionData


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on each block's projections (Hu et al. 2021)."""

    rank: int
    """r >= 1."""
    alpha: float
    """The update is (alpha / r) B A."""
    dropout: float
    """Dropout on the adapters' input."""
    targets: tuple[str, ...]
    """Projections that get adapters."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora_rank={self.rank} must be >= 1 (no adapters: adapter=None)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora_dropout={self.dropout} must be in [0, 1)")
        if not self.alpha > 0:
            raise ValueError(f"lora_alpha={self.alpha} must be > 0")


@dataclass(frozen=True)
class SpecialTokens:
    """Tokens put before (bos) and after (sep) every prompt, and the padding token."""

    bos: str = ""
    """Before every prompt; "" for none."""
    sep: str = ""
    """After every prompt; "" for none."""
    pad: str = ""
    """Pads batches; "" pads with eos."""

    def __post_init__(self) -> None:
        for name, token in (("bos", self.bos), ("sep_token", self.sep)):
            if token == GPT2_EOS:
                raise ValueError(f"{name}={GPT2_EOS!r} is GPT-2's eos, which prompts read as plain text; "
                                 f"name a new token such as '<|startoftext|>' or '<|sep|>' (it is added)")

    @property
    def names(self) -> list[str]:
        """The tokens named, bos, separator and pad in that order."""
        return [t for t in (self.bos, self.sep, self.pad) if t]

    def frame(self, prompt: str) -> str:
        """The prompt with bos before and the separator after (added tokens are recognized
        in text, so they encode to their own ids)."""
        return self.bos + prompt + self.sep


# ---------------------------------------------------------------- the one spelling
@dataclass(frozen=True)
class FinetuneConfig:
    """What to fine-tune, on what, and which parameters train; `TrainConfig` says how.

    Its flat fields are the spelling of flags, keys and keywords (and what finetune.json
    records); a field only one task reads says so. The code reads it through `data`,
    `adapter` and `tokens`.
    """

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
    """Column (or JSON field) holding the text of labeled rows."""
    label_column: str = "label"
    """Column (or JSON field) holding the label of labeled rows."""
    merge_label_case: bool = False
    """Labeled rows: treat labels that differ only by case or surrounding whitespace as one class
    (the most frequent spelling); False makes them an error that lists the spellings."""
    prompt_column: str = "prompt"
    """Column (or JSON field) holding the prompt of prompt/completion rows."""
    completion_column: str = "completion"
    """Column (or JSON field) holding the completion of prompt/completion rows."""
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
    """Special token put before every prompt (completion, or classify with as_completion), e.g.
    "<|startoftext|>"; added to the tokenizer and the model when new."""
    pad_token: str = ""
    """Special token to pad batches with, e.g. "<|pad|>" (added if new); "" pads with eos."""
    sep_token: str = ""
    """Special token put after every prompt (completion, or classify with as_completion), e.g.
    "<|sep|>"; added if new."""
    as_completion: bool = False
    """classify: teach the label word as the completion of `template` instead of training a head
    (the prompt masked); scored by label log-likelihood and greedy exact match."""
    template: str = "Review: {text}\nSentiment:"
    """classify with as_completion: the prompt of each row; must contain {text}."""
    label_prefix: str = " "
    """classify with as_completion: put between the prompt and the label word."""

    def __post_init__(self) -> None:
        check_fields(self)  # every value has its field's type (minigpt.typed)
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} must be one of {TASKS}")
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
        if self.task_run != "classify" and self.train_last_blocks == 0:
            raise ValueError("train_last_blocks=0 leaves a completion model nothing to train (its head is "
                             "tied to the embedding); use 1 or more, or LoRA")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size={self.eval_batch_size} must be >= 1")
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if unknown or not self.lora_targets:
            raise ValueError(f"lora_targets={list(self.lora_targets)} must be some of {list(LORA_TARGETS)}")
        # Each typed part checks its own fields; every task's part is built, so that a bad value
        # is refused whichever task would read it.
        _ = (ClassifyData(self._labeled, self.class_weights), self._completion, self.data, self.adapter, self.tokens)

    @property
    def task_run(self) -> str:
        """The entry of `minigpt.finetune.tasks.TASK_RUNS` that runs this config."""
        return "classify_as_completion" if self.as_completion else self.task

    @property
    def files(self) -> DataFiles:
        return DataFiles(self.train_file, self.val_file, self.val_fraction, self.split_seed, self.encoding)

    @property
    def data(self) -> TaskData:
        """The task's own data settings (the fields the other tasks read are not in it)."""
        if self.task_run == "classify":
            return ClassifyData(self._labeled, self.class_weights)
        if self.task_run == "classify_as_completion":
            return AsCompletionData(self._labeled, self.template, self.label_prefix, self.packing, self.add_eos)
        return self._completion

    @property
    def _labeled(self) -> LabeledData:
        return LabeledData(self.files, self.text_column, self.label_column, self.merge_label_case, self.max_length)

    @property
    def _completion(self) -> CompletionData:
        return CompletionData(self.files, self.prompt_column, self.completion_column, self.packing, self.add_eos,
                              self.max_generate)

    @property
    def adapter(self) -> LoRAConfig | None:
        """LoRA's settings, or None when lora_rank is 0."""
        if not self.lora_rank:
            return None
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)

    @property
    def tokens(self) -> SpecialTokens:
        return SpecialTokens(self.bos, self.sep_token, self.pad_token)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FinetuneConfig":
        """Build from a plain dict; unknown keys are an error that lists the valid ones."""
        reject_unknown_keys(cls, values)
        return cls(**values)


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
    if config.task == "classify":  # as completion too: its val_accuracy is the label's log-likelihood
        values.update(best_metric="val_accuracy", best_mode="max")
    values.update(overrides or {})
    if "warmup_steps" not in (overrides or {}) and isinstance(values["max_steps"], int):
        values["warmup_steps"] = min(values["warmup_steps"], values["max_steps"] // 10)  # short runs
    return TrainConfig.from_dict(values)


TRAIN_SECTION: dict[str, Section] = {"train": Section(TrainConfig)}
"""Fine-tuning's overridable settings: the train section (its task settings are flags)."""


def train_overrides(items: Iterable[str]) -> dict[str, Any]:
    """TrainConfig values from 'key=value' / 'train.key=value' items (dashes allowed in keys),
    read by the one loader of every run config (`minigpt.runconfig.apply_override`), as in
    `minigpt train`. Unknown keys are an error listing the valid ones."""
    return apply_overrides(TRAIN_SECTION, {}, items).get("train", {})
