"""The process group: who this process is in the job, and the collectives the loop uses.

`torchrun --nproc_per_node=N -m minigpt train ...` sets RANK, WORLD_SIZE and LOCAL_RANK.
An entry point (`minigpt.pretrain.run.pretrain`, `minigpt.finetune.run.finetune`) joins the
process group once, for the whole run, with `process_group` (NCCL on GPUs, gloo on CPUs),
and leaves it once at the end; everything inside reads where it sits with `current`. The
collectives here are no-ops without a group. Putting the model under DDP or FSDP is minigpt.train.parallel's job.
Without torchrun all of this is a no-op and the run is a single process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

PARALLEL = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp: int = 1
    """Tensor-parallel degree (minigpt.train.mesh): the ranks of one tp group read the same data."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """Which share of the global batch this rank reads (tp is the mesh's innermost dimension)."""
        return self.rank // self.tp

    @property
    def dp_size(self) -> int:
        """How many shares the global batch is divided into."""
        return self.world_size // self.tp

    def with_tp(self, tp: int) -> "DistInfo":
        """This process with the job's tensor-parallel degree known (train.tp)."""
        if self.world_size % tp:
            raise ValueError(f"train.tp={tp} must divide the number of processes, {self.world_size}: tensor "
                             f"parallelism runs under torchrun (e.g. torchrun --nproc_per_node={tp} -m minigpt train ...)")
        return dataclasses.replace(self, tp=tp)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _join(device: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (idempotent); see `process_group`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        on_gpu = resolve_device(device, info).type == "cuda"
        if on_gpu:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if on_gpu else "gloo")
        logger.info("rank %d of %d joined the process group (%s)", info.rank, world_size, dist.get_backend())
    return info


def current() -> DistInfo:
    """Where this process sits in the job, read from torchrun's environment. Under torchrun
    the group must already be joined (by the entry point's `process_group`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    if not dist.is_initialized():
        raise ValueError(f"WORLD_SIZE={world_size} (torchrun) but this process has not joined the process group; "
                         f"run inside `with minigpt.train.distributed.process_group(device):`, as `pretrain` and "
                         f"`finetune` do")
    return DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[DistInfo]:
    """Join torchrun's process group for the with-block and leave it once at its end: after
    a barrier when the block ends normally, without one on an error (a peer may be gone,
    and a barrier would hang). A group someone else joined is left to them. Without
    torchrun this is a single process and does nothing."""
    joined_here = not dist.is_initialized()
    info = _join(device)
    try:
        yield info
    except BaseException:
        if joined_here:
            _leave(sync=False)
        raise
    if joined_here:
        _leave()


def _leave(sync: bool = True) -> None:
    """Leave the process group. With `sync`, first wait for every rank, so none destroys
    its connections while a peer is still finishing a collective; pass sync=False on an
    error path, where a peer may be gone and a barrier would hang or fail."""
    if dist.is_initialized():
        if sync:
            barrier()
        dist.destroy_process_group()


def resolve_device(device: str, info: DistInfo | None = None) -> torch.device:
    """'auto' is this rank's GPU when there is one, else the CPU."""
    info = info or DistInfo()
    if device == "auto":
        device = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and info.distributed:
        device = f"cuda:{info.local_rank}"
    return torch.device(device)


def resolve_parallel(parallel: str, info: DistInfo, uses_mesh: bool = False) -> str:
    """'none', 'ddp' or 'fsdp' for a run of `info`'s size; `uses_mesh`: a mesh degree is set
    (TrainConfig.uses_mesh), so 'auto' is FSDP2 over the mesh rather than DDP."""
    if parallel == "auto":
        return ("fsdp" if uses_mesh else "ddp") if info.distributed else "none"
    if parallel != "none" and not info.distributed:
        logger.info("parallel=%r in a single process: training without it", parallel)
        return "none"
    return parallel


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (gloo has no AVG, so SUM then divide)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; `value` itself is left as it was)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_objects(obj):
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
