"""The optimizer and the learning-rate schedule of the shared loop.

`build_optimizer` groups the trainable parameters (weight decay on matrices only) into
AdamW, or Muon for the block matrices plus AdamW for the rest (minigpt.train.muon);
`lr_at` is the warm-up + cosine schedule the loop sets before each update.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from minigpt.train.config import TrainConfig
from minigpt.train.muon import MuonWithAdamW


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of update `step` (0-based): linear warm-up, then cosine decay to min_lr.

    Warm-up: lr * (step + 1) / warmup_steps for step < warmup_steps, so update 0 already
    learns and update warmup_steps - 1 uses lr. Then cosine from lr at warmup_steps to
    min_lr at decay_steps (Loshchilov & Hutter 2017, without restarts), min_lr after.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if step >= config.decay_steps:
        return config.min_lr
    progress = (step - config.warmup_steps) / (config.decay_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)



def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer | MuonWithAdamW:
    """The optimizer over the parameters that require grad; weight decay on matrices only.

    Biases and norm gains (dim < 2) never decay; embedding tables decay only with
    `decay_embeddings` (a tied LM head is the token embedding, so it follows that rule).
    With optimizer='muon', the matrices inside the transformer blocks (parameter names
    under 'blocks.', LoRA adapters excepted) get Muon updates and everything else AdamW's.
    """
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    hidden, decay, no_decay, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        matrix = p.dim() == 2 and id(p) not in embeddings
        in_block = name.startswith("blocks.") or ".blocks." in name
        if config.optimizer == "muon" and matrix and in_block and "lora_" not in name:  # adapters: AdamW
            hidden.append(p)
        elif p.dim() >= 2 and (config.decay_embeddings or id(p) not in embeddings):
            decay.append(p)
        else:
            no_decay.append(p)
    if not (hidden or decay or no_decay):
        raise ValueError("the model has no parameters with requires_grad=True; nothing to train")
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    betas = (config.beta1, config.beta2)
    if config.optimizer == "muon":
        muon = [{"params": hidden, "weight_decay": config.weight_decay, "muon": True}]
        return MuonWithAdamW(muon + groups, lr=config.lr, betas=betas)
    return torch.optim.AdamW(groups, lr=config.lr, betas=betas, fused=device.type == "cuda")

