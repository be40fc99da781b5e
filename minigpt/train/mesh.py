"""The device mesh: how a job's ranks divide into data-parallel replicas, FSDP shards and
tensor-parallel groups, and which of each a rank belongs to.

Three degrees whose product is the world size (torchtitan's `ParallelDims`):

    dp_replicate  replicas of the whole (sharded) model, each fed its own data (HSDP's outer dim)
    dp_shard      FSDP2 shards parameters, gradients and optimizer state across these ranks
    tp            tensor parallelism: each block's matrices split across these ranks (Megatron-LM)

Ranks are laid out row-major over (dp_replicate, dp_shard, tp), tp innermost, so the ranks
of one tensor-parallel group are neighbours (on one node, where the all-reduces are
cheapest). Every rank of a tensor-parallel group reads the same batch: the data is divided
by `dp_rank` / `dp_size`, never by the world rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

DIM_NAMES = ("dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class MeshShape:
    """The three degrees of a job's device mesh; see the module docstring."""

    dp_replicate: int = 1
    """Data-parallel replicas (HSDP's outer dimension): each holds full parameter shards."""
    dp_shard: int = 1
    """Data-parallel ranks that FSDP2 shards parameters, gradients and optimizer state over."""
    tp: int = 1
    """Tensor- (and sequence-) parallel ranks that split each block's matrices and activations."""

    def __post_init__(self) -> None:
        for name in DIM_NAMES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"mesh {name}={value!r} must be a positive integer (1 means that dimension "
                                 f"is not used); e.g. dp_shard=8,tp=2")

    @classmethod
    def resolve(cls, world_size: int, dp_replicate: int = 1, dp_shard: int = -1, tp: int = 1) -> MeshShape:
        """The mesh of a job of `world_size` ranks; dp_shard=-1 takes the ranks the other two leave.

        Raises ValueError naming the degrees when they do not multiply to the world size."""
        for name, value in (("dp_replicate", dp_replicate), ("tp", tp)):
            if value < 1:
                raise ValueError(f"train.{name}={value} must be at least 1")
        if dp_shard == -1:
            if world_size % (dp_replicate * tp):
                raise ValueError(
                    f"train.dp_replicate={dp_replicate} x train.tp={tp} = {dp_replicate * tp} does not divide the "
                    f"world size {world_size}; choose degrees whose product divides it (e.g. train.tp="
                    f"{_largest_divisor(world_size, tp)})")
            dp_shard = world_size // (dp_replicate * tp)
        if dp_shard < 1:
            raise ValueError(f"train.dp_shard={dp_shard} must be at least 1, or -1 for the ranks the other degrees leave")
        shape = cls(dp_replicate, dp_shard, tp)
        if shape.world_size != world_size:
            raise ValueError(
                f"the mesh dp_replicate={dp_replicate} x dp_shard={dp_shard} x tp={tp} = {shape.world_size} ranks, "
                f"but the job has {world_size} (torchrun's WORLD_SIZE); make the product {world_size}, or set "
                f"train.dp_shard=-1 to give it the ranks the other degrees leave")
        return shape

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_size(self) -> int:
        """Ranks that read different data: the replicas times the FSDP shards."""
        return self.dp_replicate * self.dp_shard

    def dp_rank(self, rank: int) -> int:
        """Which share of the global batch `rank` reads (tp is the innermost dimension)."""
        return rank // self.tp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def check_model(self, n_head: int, mlp_width: int) -> None:
        """Refuse a tensor-parallel degree that does not split the heads and the MLP evenly:
        each rank computes whole heads (so every attention backend and the banded layers work
        unchanged on its share) and an equal slice of the MLP."""
        if n_head % self.tp:
            raise ValueError(f"train.tp={self.tp} must divide model.n_head={n_head}: each rank computes whole "
                             f"heads; choose tp from {_divisors(n_head)}")
        if mlp_width % self.tp:
            raise ValueError(f"train.tp={self.tp} must divide the MLP width {mlp_width} (n_inner or 4 * n_embd); "
                             f"choose tp from {[d for d in _divisors(n_head) if mlp_width % d == 0]}")

    def build(self, device_type: str) -> DeviceMesh:
        """The `DeviceMesh` over every rank, its dimensions named by `DIM_NAMES`, with the
        flattened 'dp' dimension (dp_replicate x dp_shard) that losses are averaged over."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.tp), mesh_dim_names=DIM_NAMES)
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return mesh

    def __str__(self) -> str:
        """'dp_replicate=1,dp_shard=8,tp=2': what `minigpt inspect --mesh` takes."""
        return ",".join(f"{name}={getattr(self, name)}" for name in DIM_NAMES)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in _divisors(n) if d <= at_most)
