"""Muon for the hidden weight matrices, AdamW for everything else, as one optimizer.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks";
Liu et al. 2025, "Muon is scalable for LLM training") keeps SGD momentum for each weight
matrix and replaces the update by its nearest semi-orthogonal matrix, computed with a few
Newton-Schulz iterations. Embeddings, the LM head, biases and LayerNorm gains are not
hidden matrices and stay on AdamW. On the main job (character-level tiny Shakespeare) it
reaches a given validation loss in far fewer steps than AdamW (benchmarks/NOTES.md).

Why not `torch.optim.Muon`: it runs the iteration in bfloat16, which on CPUs without
native bf16 arithmetic takes longer than the whole forward and backward pass (measured
4x slower per step on the main job), it exists only from torch 2.9, and it takes matrices
only, so the training loop would need two optimizers. Here the iteration runs in bf16 on
CUDA and in float32 elsewhere.

Each Muon update is scaled by 0.2 * sqrt(max(rows, cols)) so its RMS matches a typical
AdamW update (Liu et al.); one learning rate and one schedule then serve both kinds of
parameter.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# Quintic Newton-Schulz coefficients from Jordan et al.: steepest slope at zero, so five
# iterations bring every singular value of the normalised momentum into about [0.7, 1.2].
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for matrix = U S V^T, by `steps` quintic Newton-Schulz iterations."""
    a, b, c = NEWTON_SCHULZ
    x = matrix.to(torch.bfloat16 if matrix.is_cuda else torch.float32)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T  # iterate on the smaller Gram matrix
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(matrix.dtype)


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer: groups with ``muon=True`` get Muon updates, the others AdamW.

    Every group has lr, weight_decay (decoupled, as in AdamW) and muon; Muon groups also
    momentum and nesterov, AdamW groups betas and eps.
    """

    def __init__(self, groups: Iterable[dict], lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=0.0, muon=False)
        super().__init__(list(groups), defaults)
        for group in self.param_groups:
            if group["muon"]:
                for p in group["params"]:
                    if p.dim() != 2:
                        raise ValueError(f"Muon takes weight matrices only; got a parameter of shape "
                                         f"{tuple(p.shape)} (put it in a group with muon=False)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                if group["muon"]:
                    self._muon(p, group)
                else:
                    self._adamw(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buffer = state["momentum_buffer"]
        buffer.mul_(group["momentum"]).add_(p.grad)
        direction = p.grad.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer
        update = orthogonalize(direction, group["ns_steps"])
        p.add_(update, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        state["exp_avg"].lerp_(p.grad, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
        bias1 = 1.0 - beta1 ** state["step"]
        bias2 = 1.0 - beta2 ** state["step"]
        denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias1)
