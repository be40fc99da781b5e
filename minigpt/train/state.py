"""What one training run carries between the loop's parts: `Run` (built once by `train`),
`LoopState` (the counters saved with each checkpoint) and `TrainResult` (what it returns)."""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from minigpt.train.config import TrainConfig
from minigpt.train.distributed import DistInfo


class Batches(Protocol):
    """A resumable source of training batches."""

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch, as CPU tensors; the loop moves them to the device."""

    def state_dict(self) -> dict:
        """Everything needed to continue from here (saved in each checkpoint)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`."""


@dataclass
class LoopState:
    """Loop counters that are saved with each checkpoint."""

    step: int = 0
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    best: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    skipped: int = 0
    skipped_in_a_row: int = 0

    def to_dict(self) -> dict:
        return {"step": self.step, "train_losses": [list(x) for x in self.train_losses], "evals": self.evals,
                "best": self.best, "best_step": self.best_step, "evals_since_best": self.evals_since_best,
                "skipped": self.skipped, "skipped_in_a_row": self.skipped_in_a_row}

    def load(self, d: dict) -> None:
        self.step = d["step"]
        self.train_losses = [(int(s), float(v)) for s, v in d["train_losses"]]
        self.evals, self.best, self.best_step = d["evals"], d["best"], d["best_step"]
        self.evals_since_best, self.skipped = d["evals_since_best"], d["skipped"]
        self.skipped_in_a_row = d.get("skipped_in_a_row", 0)  # absent from older checkpoints

    def record_eval(self, results: dict[str, float], config: TrainConfig) -> bool:
        """Add one evaluation; return whether it is the best so far (by config.best_metric)."""
        if config.best_metric not in results:
            raise ValueError(f"best_metric={config.best_metric!r} is not among the eval metrics {sorted(results)}")
        self.evals.append({"step": self.step, **results})
        value = results[config.best_metric]
        better = self.best is None or (value < self.best if config.best_mode == "min" else value > self.best)
        if better and math.isfinite(value):
            self.best, self.best_step, self.evals_since_best = value, self.step, 0
            return True
        self.evals_since_best += 1
        return False


@dataclass
class Run:
    """One training run's fixed parts, built once by `train` and handed to each helper."""

    config: TrainConfig
    info: DistInfo
    """This process's rank and the world size."""
    parallel: str
    """'none', 'ddp' or 'fsdp' (resolved from config.parallel)."""
    device: torch.device
    raw: nn.Module
    """The caller's model: what is optimized, saved and loaded."""
    module: nn.Module
    """What runs forward: `raw`, compiled and/or under DDP/FSDP (minigpt.train.parallel)."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    """Only for float16 autocast."""
    autocast: AbstractContextManager
    batches: Batches
    loss_fn: Callable[[nn.Module, dict], torch.Tensor]
    root: Path
    """out_dir/checkpoints."""
    run_metadata: dict | None = None
    save_model: Callable[[nn.Module, Path], None] | None = None
    checkpoint_files: dict[str, str] | None = None
    state: LoopState = field(default_factory=LoopState)


@dataclass
class TrainResult:
    """What `train` returns (on every rank)."""

    step: int
    """Updates completed."""
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, mean loss of that update over the global batch), for every update."""
    evals: list[dict] = field(default_factory=list)
    """Each evaluation's metrics, with its 'step'."""
    best_metric: float | None = None
    """Best value of config.best_metric seen."""
    best_step: int | None = None
    """Step at which it was seen."""
    stopped_early: bool = False
    """Whether early stopping ended the run."""
    out_dir: Path | None = None
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None

    @property
    def val_losses(self) -> list[tuple[int, float]]:
        return [(e["step"], e["val_loss"]) for e in self.evals if "val_loss" in e]
