"""A model that is never allocated whole: built on the meta device, distributed (tensor
parallelism, FSDP2) while it holds no memory, then filled shard by shard on each rank.

`init_by_name` gives every parameter GPT-2's initial distribution (Radford et al. 2019:
normal(0, 0.02) for embeddings and weight matrices, 0.02 / sqrt(2 n_layer) for the two
residual projections, zero biases, unit LayerNorm gains) from a generator seeded by the
run's seed and the parameter's single-device name. Each parameter is drawn whole on the
CPU, one at a time, and each rank keeps only its slice, so a rank's memory at start is its
shards plus the largest single parameter, never the model; and the values depend only on
(seed, name), so every mesh (and one process given the same init) starts from the same
weights. These are not the weights `GPT(config)` draws under `torch.manual_seed` (that
consumes one global stream in construction order, which a sharded start cannot replay).
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from minigpt.train.parallel import QKVColumns


def on_meta(model: nn.Module) -> bool:
    """Whether `model` holds parameters on the meta device (built but not allocated)."""
    return any(p.is_meta for p in model.parameters())


def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate `model`'s (possibly distributed) parameters on `device`, each rank only its
    shards, and fill them by `init_by_name(model, seed)`. A parameter shared by two modules
    (the tied head and embedding) stays one: `to_empty` replaces plain tensors module by
    module, so the later names are pointed at the first one's parameter again."""
    first_name: dict[int, tuple[str, str]] = {}
    aliases: list[tuple[str, str, str, str]] = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        for leaf, param in module.named_parameters(recurse=False):
            if id(param) in first_name and first_name[id(param)] != (module_name, leaf):
                aliases.append((module_name, leaf, *first_name[id(param)]))
            first_name.setdefault(id(param), (module_name, leaf))
    model.to_empty(device=device)
    for module_name, leaf, owner, owner_leaf in aliases:
        setattr(model.get_submodule(module_name), leaf, getattr(model.get_submodule(owner), owner_leaf))
    init_by_name(model, seed)


@torch.no_grad()
def init_by_name(model: nn.Module, seed: int) -> None:
    """Fill every parameter of `model` (a GPT, or a module holding one) with its initial
    value, drawn from (seed, its single-device name); see the module docstring. Plain
    tensors and DTensors (their local shards) alike."""
    from minigpt.model import GPT, LayerNorm

    gpt = next(m for m in model.modules() if isinstance(m, GPT))
    residual_std = 0.02 / math.sqrt(2 * gpt.config.n_layer)
    done: set[int] = set()
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            if id(param) in done:  # a tied matrix is filled once
                continue
            done.add(id(param))
            name = f"{module_name}.{leaf}" if module_name else leaf
            if leaf == "bias":
                value = torch.zeros(param.shape)
            elif isinstance(module, LayerNorm):
                value = torch.ones(param.shape)
            else:
                std = residual_std if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else 0.02
                value = _drawn_rows(model, module_name, leaf, param, seed, std)
            _copy_shard(param, value)


def _drawn_rows(model: nn.Module, module_name: str, leaf: str, param: torch.Tensor, seed: int,
                std: float) -> torch.Tensor:
    """normal(0, std) values for `param`, from a generator seeded by the single-device name;
    a split q/k/v projection takes its rows of the fused matrix's draw."""
    parent_name, _, part = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, QKVColumns):
        fused = _normal((3 * param.shape[0], *param.shape[1:]), f"{parent_name}.{leaf}", seed, std)
        return fused.chunk(3)["qkv".index(part)]
    return _normal(tuple(param.shape), f"{module_name}.{leaf}", seed, std)


def _normal(shape: tuple[int, ...], name: str, seed: int, std: float) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def _copy_shard(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy `value` (the whole parameter, CPU) into `param`: its local shard for a DTensor."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                                  src_data_rank=None).to_local()  # slices, no communication
        param.to_local().copy_(local)
    else:
        param.copy_(value)
