"""Parameter-efficient fine-tuning: LoRA adapters and freezing all but the last blocks.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3) keeps a
pretrained weight W (out, in) frozen and learns a low-rank update:
    h = W x + b + (alpha / r) * B A dropout(x),    A: (r, in), B: (out, r)
A starts random and B at zero, so training starts exactly at the pretrained model. After
training, W + (alpha / r) B A is one ordinary matrix (`merge_lora`), so the exported model
has the original architecture and no inference cost.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
"""Linear layers inside each block that get adapters: attention q/k/v and output, MLP in and out."""


class LoRALinear(nn.Module):
    """An `nn.Linear` (frozen, as `base`) plus a trainable rank-r update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"lora rank={rank!r} must be a positive integer")
        if rank > min(base.in_features, base.out_features):
            raise ValueError(f"lora rank={rank} exceeds min(in, out)=({base.in_features}, {base.out_features}) "
                             f"of the layer; a full-rank update is just fine-tuning")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora dropout={dropout} must be in [0, 1)")
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        # A as nn.Linear would initialise its weight (as the paper's reference code does).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out); the update goes through the rank-r bottleneck.
        update = self.dropout(x) @ self.lora_A.T @ self.lora_B.T  # (..., r) then (..., out)
        return self.base(x) + self.scaling * update

    @property
    def weight(self) -> torch.Tensor:
        """(out, in): the matrix this layer applies, as `nn.Linear.weight` (the model's
        head-by-head paths for TransformerLens's optional hooks read it)."""
        return self.base.weight + self.delta_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """(out, in): the update this adapter adds to base.weight."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def merged(self) -> nn.Linear:
        """A plain linear layer of the base's own type computing the same function (without dropout)."""
        base = self.base
        out = type(base)(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(base.weight + self.delta_weight())
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out


def _blocks(model: nn.Module) -> nn.ModuleList:
    gpt = getattr(model, "backbone", model)
    return gpt.blocks


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Sequence[str] = LORA_TARGETS, trainable: Sequence[str] = ()) -> int:
    """Wrap each block's `targets` in LoRALinear and freeze every other parameter, except
    those whose name starts with one of `trainable` (e.g. "score." for a classifier's head).

    `model` is a GPT or a GPTClassifier; changed in place. Returns the number of trainable
    parameters. Raises ValueError for an unknown target name.
    """
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {list(LORA_TARGETS)}")
    model.requires_grad_(False)
    for block in _blocks(model):
        for target in targets:
            parent_name, child_name = target.split(".")
            parent = getattr(block, parent_name)
            child = getattr(parent, child_name)
            if isinstance(child, LoRALinear):
                raise ValueError("this model already has LoRA adapters; merge_lora it first")
            setattr(parent, child_name, LoRALinear(child, rank, alpha, dropout))
    for name, p in model.named_parameters():
        if "lora_" in name.rsplit(".", 1)[-1] or any(name.startswith(t) for t in trainable):
            p.requires_grad_(True)
    return count_trainable(model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by the equivalent plain nn.Linear, in place; returns `model`.
    The result has the original parameter names, so it saves to the Hugging Face layout."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def freeze_all_but_last(model: nn.Module, n_blocks: int, trainable: Sequence[str] = ()) -> int:
    """Train only the last `n_blocks` blocks, the final LayerNorm, and parameters whose
    name starts with one of `trainable` (e.g. "score." for a classifier's head); 0 blocks
    means the head alone. Changed in place; returns the number of trainable parameters.

    Embeddings stay frozen, and with them a head tied to the token embedding.
    """
    blocks = _blocks(model)
    if not isinstance(n_blocks, int) or not 0 <= n_blocks <= len(blocks):
        raise ValueError(f"n_blocks={n_blocks!r} must be an integer in 0..n_layer={len(blocks)}")
    model.requires_grad_(False)
    for block in list(blocks)[len(blocks) - n_blocks:]:
        block.requires_grad_(True)
    if n_blocks > 0:
        getattr(model, "backbone", model).ln_f.requires_grad_(True)
    for name, p in model.named_parameters():
        if any(name.startswith(t) for t in trainable):
            p.requires_grad_(True)
    n = count_trainable(model)
    if n == 0:
        raise ValueError("nothing left to train: with n_blocks=0 the model needs a head (a classifier)")
    return n


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
