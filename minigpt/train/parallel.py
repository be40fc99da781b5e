"""How the model is run, applied from outside it, in one function: `parallelize`.

In order (torchtitan's: per-block transforms first, then sharding): the attention backend
on every GPT, activation checkpointing per transformer block, torch.compile per
transformer block, then DDP or FSDP2 (`fully_shard` per block, then the root). The model
itself stays single-device and knows none of this.

Compiling each block rather than the whole model is torchtitan's choice too: every block
of a kind reuses one compiled graph, so compiling costs about one block instead of all of
them (GPT-2 124M's training step on a 2-core CPU, an empty inductor cache: 28 s before the
first update instead of 71 s, benchmarks/NOTES.md), while the blocks hold nearly all of the FLOPs.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minigpt.ops import use_backend
from minigpt.train.config import TrainConfig


@contextmanager
def parallelize(model: nn.Module, config: TrainConfig, parallel: str, device: torch.device) -> Iterator[nn.Module]:
    """Yield the module to train on `model` (already on `device`): `model` itself, under DDP,
    or sharded in place by FSDP2, after setting config.backend on every GPT and, with
    config.activation_checkpointing, checkpointing each transformer block, and with
    config.compile, compiling each transformer block in place (`nn.Module.compile`).

    The model's own modules, parameters and state_dict keys are unchanged; checkpointing and
    compiling are undone on exit, so the caller gets back the model it passed (sampling from
    it afterwards runs eagerly, without recompiling for the KV cache's shapes).
    """
    use_backend(model, config.backend)
    blocks = _blocks(model)
    for block in blocks:
        if config.activation_checkpointing:
            block.forward = functools.partial(_checkpointed_forward, block)
        if config.compile:
            block.compile()
    try:
        yield _wrap(model, parallel, device)
    finally:
        for block in blocks:
            if config.activation_checkpointing:
                del block.forward  # the instance attribute; the class's forward shows through again
            if config.compile:
                block._compiled_call_impl = None  # what nn.Module.compile set: calls run eagerly again


def mixed_precision(device: torch.device, dtype: str) -> tuple[torch.dtype, torch.amp.GradScaler | None,
                                                                AbstractContextManager]:
    """(autocast dtype, a GradScaler when it is float16, the autocast context) for config.dtype.
    'auto' is bfloat16 on CUDA (float16 where bf16 is unsupported) and float32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda":
            resolved = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            resolved = torch.float32
    else:
        resolved = getattr(torch, dtype)
    scaler = torch.amp.GradScaler(device.type) if resolved == torch.float16 else None
    autocast = torch.autocast(device.type, dtype=resolved) if resolved != torch.float32 else nullcontext()
    return resolved, scaler, autocast


def _blocks(model: nn.Module) -> list[nn.Module]:
    from minigpt.model import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    """`block`'s forward, keeping only its inputs for backward and recomputing the rest
    there (Chen et al. 2016): activation memory of one block instead of every block.
    torch.utils.checkpoint restores the RNG state, so dropout masks, losses and gradients
    are the same as without it."""
    if not torch.is_grad_enabled():
        return type(block).forward(block, *args, **kwargs)
    return checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)


def _wrap(model: nn.Module, parallel: str, device: torch.device) -> nn.Module:
    """The module to train: `model` itself, under DDP, or sharded in place by FSDP2."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from minigpt.model import Block

        # Shard each transformer block, then the root (embeddings, final norm, head).
        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module)
        fully_shard(model)
        return model
    return model
