"""Plain-PyTorch twins of the Triton kernels.

These are the slow, obviously-correct versions every kernel is tested against. They
materialise the full T x T score matrix, so use them for checking, not for speed.
Both compute in float32 (or float64 when given float64) and cast the result back to
the input dtype, matching the kernels' float32 accumulation.
"""
from __future__ import annotations

import math

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for low-precision inputs, the input dtype when it is wider."""
    return torch.promote_types(dtype, torch.float32)


def attention_mask(
    seq_len: int, causal: bool, window: int | None, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean (T, T) mask, True where query ``i`` may attend to key ``j``.

    Causal: ``j <= i``. Banded (``window=w``): additionally ``j > i - w``, so query ``i``
    sees keys ``i-w+1 .. i``. Non-causal without a window: every pair.

    This is the house's one mask rule, which ``minigpt.masks.visible`` defines for the model
    (this package never imports minigpt, so it is spelled here too) and which the kernel
    evaluates per tile (``_attention_mask`` in ``attention.py``); tests/test_ops_banded.py
    checks that the three agree.
    """
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= j > i - window
    return allowed


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T + mask) v with an explicit mask; see ``minigpt_kernels.attention``.

    Args:
        q, k, v: (B, H, T, D) tensors of one floating dtype.
        causal: mask keys after the query.
        window: banded causal attention; query ``i`` sees keys ``j`` with ``i-w < j <= i``.
        scale: softmax scale; ``None`` means ``1/sqrt(D)``.

    Returns:
        (B, H, T, D) tensor in the input dtype, computed in float32 (float64 for float64).
    """
    if window is not None and not causal:
        raise ValueError(f"window={window} requires causal=True; banded attention is causal")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    dtype = _compute_dtype(q.dtype)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    scores = (qf @ kf.transpose(-2, -1)) * scale  # (B, H, T, T)
    mask = attention_mask(q.shape[-2], causal, window, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ vf).to(q.dtype)  # (B, H, T, D)


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim (biased variance).

    Args:
        x: (..., N) tensor.
        weight: (N,) scale.
        bias: (N,) shift, or None.
        eps: added to the variance.

    Returns:
        Tensor shaped like ``x`` in ``x.dtype``, computed in float32 (float64 for float64).
    """
    dtype = _compute_dtype(x.dtype)
    xf = x.to(dtype)
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)
