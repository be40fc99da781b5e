"""The shape of a fine-tuning task: what it starts from (`RunStart`) and what it hands the
shared training loop (`TaskRun`, built once by the task and never patched afterwards).

Each task is one module (`classify`, `completion`, `as_completion`) with one function
`(its data config, RunStart) -> TaskRun`, named in `minigpt.finetune.tasks.TASK_RUNS`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from minigpt.finetune.config import SpecialTokens
from minigpt.finetune.data import LabelMap, ShuffledBatches
from minigpt.finetune.export import FinetuneMeta
from minigpt.train.config import TrainConfig


@dataclass(frozen=True)
class RunStart:
    """What every task starts from."""

    backbone: nn.Module
    """The GPT, its special tokens added."""
    tokenizer: Any
    """Its tokenizer, special tokens added."""
    train_config: TrainConfig
    """The run's training config (batch size, seed, parallelism)."""
    eval_batch_size: int
    """Batch size of validation passes."""
    tokens: SpecialTokens
    """The special tokens put around prompts."""
    choose_trainable: Callable[[nn.Module, tuple[str, ...]], dict[str, int]]
    """Makes only the parameters that train trainable (LoRA adapters, the last blocks or
    all), also those whose names start with the given prefixes; returns
    {"trainable_params", "total_params"}."""
    settings: dict = field(default_factory=dict)
    """The run's config as finetune.json records it."""

    def batches(self, examples: Sequence, collate: Callable[[Sequence], dict]) -> ShuffledBatches:
        """Shuffled batches of this rank's share (the run's process group is joined by
        `finetune`; the ranks of a tensor-parallel group share one)."""
        from minigpt.train import distributed as dist_

        config = self.train_config
        share = dist_.current().with_tp(config.tp)
        return ShuffledBatches(examples, config.batch_size, collate, config.seed, share.dp_rank, share.dp_size)

    def meta(self, task: str, details: dict, **fields: Any) -> FinetuneMeta:
        """The fine-tuned folder's finetune.json: the saved task, its fields and how it was trained."""
        return FinetuneMeta(task, details={"finetune": self.settings, **details}, **fields)


@dataclass(frozen=True)
class TaskRun:
    """Everything the loop needs for one task, plus what the final evaluation needs."""

    model: nn.Module
    """What trains: the backbone, or a classifier around it."""
    train_batches: ShuffledBatches
    eval_batches: Callable[[], Iterable[dict]]
    """A fresh pass over the validation batches (val_loss)."""
    loss_fn: Callable
    extra_eval: Callable[[nn.Module], dict[str, float]] | None
    """Metrics beside val_loss at each evaluation (val_accuracy, ...), or None."""
    evaluate: Callable[[nn.Module], Any]
    """The final report on the validation rows."""
    meta: FinetuneMeta
    """What the exported folder's finetune.json records."""
    labels: LabelMap | None = None
    """A classifier's labels (labels.json)."""
    details: dict = field(default_factory=dict)
    """Counts of rows and parameters, also recorded in meta.details."""
