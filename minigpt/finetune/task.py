"""The shape of a fine-tuning task: what it starts from (`RunStart`) and what it hands the
shared training loop (`TaskRun`, built once by the task and never patched afterwards).

Each task is one module (`classify`, `completion`, `as_completion`) with one function
`(its data config, RunStart) -> TaskRun`, named in `minigpt.finetune.tasks.TASK_RUNS`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from minigpt.finetune.config import LoRAConfig, SpecialTokens
from minigpt.finetune.data import LabelMap, ShuffledBatches
from minigpt.finetune.export import FinetuneMeta
from minigpt.finetune.lora import apply_lora, count_trainable, freeze_all_but_last
from minigpt.train.config import TrainConfig

log = logging.getLogger(__name__)


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
    adapter: LoRAConfig | None
    """LoRA adapters to train (`FinetuneConfig.adapter`), or None."""
    train_last_blocks: int | None
    """Without adapters: train only the last N blocks (and the head); None trains all."""
    settings: dict = field(default_factory=dict)
    """The run's config as finetune.json records it."""

    def batches(self, examples: Sequence, collate: Callable[[Sequence], dict]) -> ShuffledBatches:
        """Shuffled batches of this rank's share (the run's process group is joined by
        `finetune`; the ranks of a tensor-parallel group share one)."""
        from minigpt.train import distributed as dist_

        config = self.train_config
        share = dist_.current().with_tp(config.tp)
        return ShuffledBatches(examples, config.batch_size, collate, config.seed, share.dp_rank, share.dp_size)

    def choose_trainable(self, model: nn.Module, head: tuple[str, ...]) -> dict[str, int]:
        """Make only the parameters that train trainable: LoRA adapters, the last blocks or all;
        beside adapters or the last blocks, also those whose names start with `head`'s
        prefixes (the task's head). Returns {"trainable_params", "total_params"}."""
        if self.adapter is not None:
            lora = self.adapter
            apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets, trainable=head)
        elif self.train_last_blocks is not None:
            freeze_all_but_last(model, self.train_last_blocks, trainable=head)
        trainable, total = count_trainable(model), sum(p.numel() for p in model.parameters())
        log.info("training %s of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
        return {"trainable_params": trainable, "total_params": total}

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
