"""What one training run carries between the loop's parts: `Run` (built once by `train`),
`LoopState` (the counters saved with each checkpoint), `Update` (what one optimizer update
leaves to record) and `TrainResult` (what it returns)."""
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
from minigpt.train.mesh import MeshShape
from minigpt.train.threads import MicroBatchThreads


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN or infinite (and on_nonfinite='stop'), or too many
    updates in a row were skipped (on_nonfinite='skip', max_consecutive_skips)."""


class Batches(Protocol):
    """A resumable source of training batches."""

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch, as CPU tensors; the loop moves them to the device."""

    def state_dict(self) -> dict:
        """Everything needed to continue from here (saved in each checkpoint)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`."""


class Checkpoints(Protocol):
    """What the loop asks of its checkpoints: `minigpt.train.checkpoint.Checkpointer`. A
    structural type, so that this module and checkpoint.py (which reads a `Run`) do not
    import each other."""

    root: Path
    """The checkpoints folder (out_dir/checkpoints)."""

    def find(self, model: nn.Module) -> tuple[Path | None, dict | None]: ...

    def load(self, saved: dict, run: Run) -> None: ...

    def save(self, run: Run, best: bool) -> Path: ...

    def best(self) -> Path | None: ...


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

    def record(self, update: Update, config: TrainConfig, scaled: bool, root: Path) -> None:
        """Record one read update: keep its loss, or count it as skipped (too many in a row is
        an error, max_consecutive_skips). A non-finite update that was not skipped (under
        on_nonfinite='stop') raises, naming its step and lr; `root` is the checkpoints folder."""
        bad = None if update.skipped else update.nonfinite(scaled)
        if bad is not None:
            raise NonFiniteLossError(
                f"{bad} at step {update.step} (lr {update.lr:.3g}); stopped without saving, so the last "
                f"checkpoint in {root} is intact. Lower lr, raise warmup_steps, check the data, "
                f"or set on_nonfinite='skip' to skip such updates")
        if not update.skipped:
            self.skipped_in_a_row = 0
            self.train_losses.append((update.step, update.loss))
            return
        self.skipped += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= config.max_consecutive_skips:
            raise NonFiniteLossError(
                f"{self.skipped_in_a_row} updates in a row (steps {update.step - self.skipped_in_a_row + 1}"
                f" to {update.step}) had a NaN/inf loss or gradient and were skipped "
                f"(on_nonfinite='skip', max_consecutive_skips={config.max_consecutive_skips}); the "
                f"model or data no longer yields finite values. Stopped without saving: the last "
                f"checkpoint in {root} is intact. Lower lr, raise warmup_steps or check the data, then "
                f"resume; or raise max_consecutive_skips")

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
class Update:
    """One optimizer update, as the loop records it. Its loss and gradient norm stay on the
    device (`unread`) until the loop's next read point, where `read_updates` fetches those of
    every update since the last one in a single transfer (see the loop's docstring)."""

    step: int
    """The step this update completes (1 for the first)."""
    lr: float
    tokens: int
    """Tokens in this rank's batches."""
    head_tokens: int
    """Of them, the positions the LM head ran on."""
    seq_len: int | None
    """T of the batches, None when they carry no token ids."""
    unread: torch.Tensor | None = None
    """[mean loss over the global batch, gradient norm] in float64 on the device, until read."""
    loss: float = math.nan
    grad_norm: float = math.nan
    skipped: bool = False
    """Not applied: its loss or gradient was NaN/inf and on_nonfinite='skip'."""
    seconds: float = 0.0
    """Wall time of the update, and of waiting for the device when its numbers were read."""

    def nonfinite(self, scaled: bool) -> str | None:
        """What is NaN/inf about this (read) update, or None. Under a GradScaler (`scaled`) an
        infinite gradient is the scaler's business: scaler.step skips that update itself."""
        if not math.isfinite(self.loss):
            return f"loss is {self.loss}"
        if not scaled and not math.isfinite(self.grad_norm):
            return f"gradient norm is {self.grad_norm} (loss {self.loss:.4f})"
        return None


def read_updates(updates: list[Update]) -> None:
    """Fetch the loss and gradient norm of every update not yet read, in one device-to-host
    transfer: the loop's one device sync outside evaluation and checkpointing."""
    unread = [u for u in updates if u.unread is not None]
    if not unread:
        return
    values = torch.stack([u.unread for u in unread]).tolist()
    for update, (loss, grad_norm) in zip(unread, values):
        update.loss, update.grad_norm, update.unread = loss, grad_norm, None


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
    checkpointer: Checkpoints
    """Finds, loads and saves the run's checkpoints (minigpt.train.checkpoint.Checkpointer)."""
    mesh: MeshShape | None = None
    """The device mesh's degrees on the mesh path (parallel='fsdp'), else None."""
    threads: MicroBatchThreads | None = None
    """Under cpu_parallel='micro_batches', the threads that run micro-batches at once (minigpt.train.threads)."""
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
