"""Data parallelism across the CPU's threads in one process: `cpu_parallel='micro_batches'`.

torch's way to use several cores (`cpu_parallel='ops'`) splits every operation across
them. A small model's operations are too small for that to pay: at the main job's shape (2
layers of 96, micro-batches of 24 x 64 characters) a matrix product takes tens of
microseconds, and the threads spend much of it waiting for each other. Instead, each of an
update's micro-batches can run whole on one thread, its operations single-threaded, one
micro-batch per thread at once; the gradients each thread returns are then added up in
micro-batch order. Adding in a fixed order makes the update bitwise what one thread
computing the micro-batches one after another gives (a test checks this), however the
threads interleave. The memory cost: up to one micro-batch's activations and one set of
gradients per thread at once, where in turn there is one of each (`batch_size` and
`grad_accum` then trade memory for nothing: lower the thread count instead).

Python's GIL is released inside every torch operation, so the threads overlap in the
operations and take turns only in the Python between them. Between updates, the optimizer
hands its independent pieces to the same threads where it can (`MuonWithAdamW.run_jobs`:
each stack of same-shaped matrices, the AdamW group; another optimizer steps on one
thread), checkpoints are written from one thread, and an `extra_eval` (a fine-tuning run's
accuracy) gets all of the run's threads back for torch's own splitting.

Dropout would draw its random numbers from the one global generator in whatever order the
threads reach it, so a model with dropout runs its micro-batches one after another (with a
warning) rather than unrepeatably; so do a GPU run, a run across processes (torchrun),
float16's GradScaler and torch.compile (not thread-safe), so that a recipe that asks for
threads runs anywhere.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from typing import TypeVar

import torch
from torch import nn

logger = logging.getLogger(__name__)

CPU_PARALLEL = ("ops", "micro_batches")

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatchThreads:
    """A fixed pool of threads whose torch operations are single-threaded; `map` runs a
    function over items on them and returns the results in the items' order. `given`: the
    torch thread count the run was given (the pool uses `threads` of them)."""

    def __init__(self, threads: int, given: int):
        self.threads, self.given = threads, given
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="micro-batch",
                                        initializer=torch.set_num_threads, initargs=(1,))

    def map(self, fn: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
        """[fn(item) for item in items], up to `threads` at once; the first exception is raised."""
        return list(self._pool.map(fn, items))

    @contextmanager
    def all_threads(self) -> Iterator[None]:
        """torch's operations on all `given` threads again, for work outside the pool."""
        torch.set_num_threads(self.given)
        try:
            yield
        finally:
            torch.set_num_threads(1)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _why_not(device: torch.device, parallel: str, model: nn.Module, scaled: bool, compiled: bool) -> str | None:
    """Why this run cannot put its micro-batches on threads, or None."""
    if device.type != "cpu":
        return f"the run is on {device}, not the CPU"
    if parallel != "none":
        return f"the run is already data-parallel across processes (parallel={parallel!r})"
    if scaled:
        return "float16's GradScaler scales each backward pass (use dtype 'float32' or 'bfloat16')"
    if compiled:
        return "torch.compile is not thread-safe (train.compile=True)"
    drawing = [(name or "the model", m.p) for name, m in model.named_modules()
               if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if drawing:
        name, p = drawing[0]
        return (f"the model has dropout ({name}: p={p}), whose random numbers concurrent micro-batches would draw in "
                f"a different order every run")
    return None


@contextmanager
def micro_batch_threads(cpu_parallel: str, grad_accum: int, device: torch.device, parallel: str, model: nn.Module,
                        *, scaled: bool = False, compiled: bool = False) -> Iterator[MicroBatchThreads | None]:
    """The run's thread pool under cpu_parallel='micro_batches', else None: under 'ops', where
    there is nothing to run at once (one thread or one micro-batch per update), and, with a
    warning that says why, where it cannot be used (`_why_not`: a GPU, several processes,
    float16's scaler (`scaled`), torch.compile (`compiled`), dropout), so that a recipe that
    asks for it still runs there. torch's own operations run on one thread while the pool is
    open; its thread count is restored on exit."""
    if cpu_parallel == "ops":
        yield None
        return
    why_not = _why_not(device, parallel, model, scaled, compiled)
    if why_not is not None:
        logger.warning("train.cpu_parallel='micro_batches' is not used: %s; the micro-batches run one after another "
                       "(set train.cpu_parallel='ops' to say so)", why_not)
        yield None
        return
    given = torch.get_num_threads()
    threads = min(given, grad_accum)
    if threads < 2:
        logger.info("cpu_parallel='micro_batches' with %d thread(s) and grad_accum=%d: nothing to run at once, the "
                    "micro-batches run one after another", given, grad_accum)
        yield None
        return
    pool = MicroBatchThreads(threads, given)
    torch.set_num_threads(1)
    try:
        yield pool
    finally:
        torch.set_num_threads(given)  # first: a second Ctrl-C while the pool closes must not skip it
        pool.close()


def fresh(context: AbstractContextManager) -> AbstractContextManager:
    """A copy of `context` for one thread: torch.autocast keeps what it restores on exit in
    the object itself, so threads entering one object at once would share it."""
    return copy.copy(context)
