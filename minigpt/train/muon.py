"""Muon for the hidden weight matrices, AdamW for everything else, as one optimizer.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks";
Liu et al. 2025, "Muon is scalable for LLM training") keeps SGD momentum for each weight
matrix and replaces the update by its nearest semi-orthogonal matrix, computed with a few
Newton-Schulz iterations. Embeddings, the LM head, biases and LayerNorm gains are not
hidden matrices and stay on AdamW. On the main job (character-level tiny Shakespeare) it
reaches a given validation loss in far fewer steps than AdamW (benchmarks/NOTES.md).

Why not `torch.optim.Muon`: it runs the iteration in bfloat16 everywhere, which on CPUs
without native bf16 arithmetic takes longer than the whole forward and backward pass
(measured 4x slower per step on the main job), it exists only from torch 2.9, and it takes
matrices only, so the training loop would need two optimizers. Here the iteration runs in
bf16 where the hardware multiplies it natively (CUDA; CPUs with AVX-512 BF16, where it is
about 3x faster than float32) and in float32 elsewhere (`iteration_dtype`).

Each Muon update is scaled by 0.2 * sqrt(max(rows, cols)) so its RMS matches a typical
AdamW update (Liu et al.); one learning rate and one schedule then serve both kinds of
parameter.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import torch

# Quintic Newton-Schulz coefficients from Jordan et al.: steepest slope at zero, so five
# iterations bring every singular value of the normalised momentum into about [0.7, 1.2].
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def iteration_dtype(device: torch.device) -> torch.dtype:
    """The Newton-Schulz iteration's dtype on `device`: bfloat16 where the hardware multiplies
    it natively (CUDA; CPUs with AVX-512 BF16, through oneDNN), float32 elsewhere, where
    bfloat16 products are emulated and slower than float32's. The iteration only needs the
    singular values brought near one, which bfloat16 does as well (Jordan et al. run it so)."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and _cpu_multiplies_bf16() else torch.float32


@functools.cache
def _cpu_multiplies_bf16() -> bool:
    """AVX-512 BF16 on this CPU: asked once, not on every update's orthogonalization."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def orthogonalize(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately U V^T for matrix = U S V^T, by `steps` quintic Newton-Schulz iterations
    in `dtype` (None: `iteration_dtype` of the matrix's device).

    `matrix` is (rows, cols) or a stack (..., rows, cols) orthogonalized one by one.
    """
    a, b, c = NEWTON_SCHULZ
    x = matrix.to(dtype or iteration_dtype(matrix.device))
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT  # iterate on the smaller Gram matrix
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    x = x.reshape(math.prod(x.shape[:-2]), *x.shape[-2:])  # (S, r, c) with r <= c: baddbmm takes a stack
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram @ gram
        x = torch.baddbmm(x, poly, x, beta=a)  # a * x + poly @ x, in one pass over x
    x = x.reshape(matrix.mT.shape if tall else matrix.shape)  # (..., r, c) again
    return (x.mT if tall else x).to(matrix.dtype)


class MuonWithAdamW:
    """One optimizer: groups with ``muon=True`` get Muon updates, the others AdamW.

    Every group has lr, weight_decay (decoupled, as in AdamW) and muon; Muon groups also
    momentum and nesterov, AdamW groups betas and eps. `ns_dtype` is the Newton-Schulz
    iteration's dtype for every Muon matrix (None: `iteration_dtype` of its device). It has
    the interface the training loop and `torch.amp.GradScaler` use (param_groups, step, zero_grad, state_dict,
    load_state_dict) but is deliberately not a `torch.optim.Optimizer`: that class imports
    torch._dynamo on construction, about 150 MB of resident memory, which on the main job
    would be a third of the process.

    `run_jobs` runs a step's independent pieces of work (a stack of same-shaped Muon
    matrices, an AdamW group): the builtin `map` by default, one after another; the training
    loop hands it its micro-batch threads' `map` (minigpt.train.threads), which runs them at
    once. No two pieces touch the same parameter, so the update is the same either way.
    """

    def __init__(self, groups: Iterable[dict], lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 ns_dtype: torch.dtype | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=0.0, muon=False)
        if ns_dtype is not None and not (isinstance(ns_dtype, torch.dtype) and ns_dtype.is_floating_point):
            raise ValueError(f"ns_dtype={ns_dtype!r} must be a floating-point torch dtype (torch.float32, "
                             f"torch.bfloat16) or None for each device's own choice")
        self.ns_dtype = ns_dtype  # None: iteration_dtype of each parameter's device
        self.run_jobs: Callable[[Callable, Iterable], Iterable] = map
        self.param_groups = [{**defaults, **group, "params": list(group["params"])} for group in groups]
        self.state: dict[torch.Tensor, dict] = {}
        for group in self.param_groups:
            if group["muon"]:
                for p in group["params"]:
                    if p.dim() != 2:
                        raise ValueError(f"Muon takes weight matrices only; got a parameter of shape "
                                         f"{tuple(p.shape)} (put it in a group with muon=False)")

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._params():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict:
        """torch.optim's layout: per-parameter state by position, groups without tensors."""
        index = {id(p): i for i, p in enumerate(self._params())}
        groups, start = [], 0
        for group in self.param_groups:
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + len(group["params"])))})
            start += len(group["params"])
        state = {index[id(p)]: dict(values) for p, values in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = [len(g["params"]) for g in state_dict["param_groups"]]
        ours = [len(g["params"]) for g in self.param_groups]
        if saved != ours:
            raise ValueError(f"optimizer state has groups of {saved} parameters, this optimizer {ours}; "
                             f"was it saved with the same model and optimizer setting?")
        params = self._params()
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        self.state = {}
        for i, values in state_dict["state"].items():
            p = params[int(i)]
            for name, value in values.items():
                if torch.is_tensor(value) and value.shape != p.shape:
                    raise ValueError(f"optimizer state {name!r} of parameter {i} has shape {tuple(value.shape)}, "
                                     f"the parameter {tuple(p.shape)}; the state belongs to another model")
            self.state[p] = {k: v.to(p.device, p.dtype, copy=True) if torch.is_tensor(v) else v
                             for k, v in values.items()}

    @torch.no_grad()
    def step(self) -> None:
        jobs: list[Callable[[], None]] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["weight_decay"]:
                for p in params:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
            if group["muon"]:
                jobs += [functools.partial(self._muon, same, group) for same in _stacks(params)]
            elif params:
                jobs.append(functools.partial(self._adamw_group, params, group))
        for _ in self.run_jobs(_call, jobs):  # consumed: map is lazy
            pass

    def _muon(self, same: list[torch.Tensor], group: dict) -> None:
        """One Muon update of matrices of one shape, orthogonalized as one stack."""
        directions = []
        for p in same:
            state = self.state.setdefault(p, {})
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffer = state["momentum_buffer"]
            buffer.mul_(group["momentum"]).add_(p.grad)
            directions.append(p.grad.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer)
        updates = orthogonalize(torch.stack(directions), group["ns_steps"], dtype=self.ns_dtype)
        for p, update in zip(same, updates):
            p.add_(update, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))

    def _adamw_group(self, params: list[torch.Tensor], group: dict) -> None:
        for p in params:
            self._adamw(p, group)

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        state = self.state.setdefault(p, {})
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


def _stacks(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`params` grouped by shape and device. Matrices of one shape (the same projection in every
    layer) are orthogonalized as one stack: on a CPU, 4 batched iterations instead of 16 small
    ones cut the step's optimizer time several-fold (benchmarks/NOTES.md)."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        by_shape.setdefault((p.shape, p.device), []).append(p)
    return list(by_shape.values())


def _call(job: Callable[[], None]) -> None:
    with torch.no_grad():  # a thread's own mode: step's decorator covers only the thread that called it
        job()
