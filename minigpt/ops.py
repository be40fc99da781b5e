"""The one seam between the model and its compute backends.

Three attention backends agree within stated tolerances:

- ``math``: the readable reference, an explicit masked softmax (and the only path that
  can return attention probabilities);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``;
- ``triton``: the fused kernels in the standalone ``kernels`` package (attention and
  LayerNorm). Triton needs CUDA, or ``TRITON_INTERPRET=1`` on a CPU; otherwise the
  model falls back to ``sdpa`` and says so once in the log.

Masks follow the house's single definition: query i sees key j iff j <= i and, in a
banded layer of width w, i - w < j.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("math", "sdpa", "triton")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; choose one of {BACKENDS}")
    return backend


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logger.info(message)


def _triton_usable(x: torch.Tensor) -> bool:
    if x.is_cuda:
        return True
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    _log_once("backend='triton' needs CUDA (or TRITON_INTERPRET=1 on a CPU); using the PyTorch 'sdpa' path")
    return False


def _kernels():
    try:
        import kernels
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(f"backend='triton' needs the 'kernels' package and Triton: {err}") from err
    return kernels


def _kernel_head_dim_ok(head_dim: int) -> bool:
    supported = _kernels().ATTENTION_HEAD_DIMS
    if head_dim in supported:
        return True
    _log_once(f"the Triton attention kernel supports head_dim in {supported}, not {head_dim}; using 'sdpa' for attention")
    return False


def band_mask(q_index: torch.Tensor, k_index: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask: True where query at index q_index[i] may see key k_index[j]."""
    diff = q_index[:, None] - k_index[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


def build_mask(
    q_index: torch.Tensor, k_index: torch.Tensor, window: int | None, left_pad: torch.Tensor | None
) -> torch.Tensor:
    """Mask for attention with explicit key indices (KV cache, padded batches).

    Returns a (Tq, Tk) mask without padding, or (B, 1, Tq, Tk) with left padding. A padding
    query sees itself only, so its softmax row is never empty (its output is unused).
    """
    mask = band_mask(q_index, k_index, window)
    if left_pad is None:
        return mask
    real_key = k_index[None, :] >= left_pad[:, None]  # (B, Tk)
    mask = mask[None] & real_key[:, None, :]  # (B, Tq, Tk)
    mask |= q_index[:, None] == k_index[None, :]
    return mask[:, None]


def _math_attention(q, k, v, mask, scale, dropout_p, training):
    # (B, H, Tq, D) @ (B, H, D, Tk) -> (B, H, Tq, Tk); the softmax runs in float32.
    scores = (q @ k.transpose(-2, -1)).float() * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = F.dropout(probs, p=dropout_p, training=training) @ v
    return out, probs


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None,
    scale: float,
    backend: str,
    dropout_p: float = 0.0,
    training: bool = False,
    return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal (dense or banded) self-attention over a whole sequence.

    q, k, v: (B, H, T, D). Returns (out (B, H, T, D), probs (B, H, T, T) or None);
    probabilities come only from the math path.
    """
    T = q.shape[-2]
    if return_probs or backend == "math":
        index = torch.arange(T, device=q.device)
        out, probs = _math_attention(q, k, v, band_mask(index, index, window), scale, dropout_p, training)
        return out, (probs if return_probs else None)
    if backend == "triton" and _triton_usable(q) and _kernel_head_dim_ok(q.shape[-1]):
        if dropout_p > 0 and training:
            _log_once("the Triton attention kernel has no dropout; using 'sdpa' while dropout > 0 in training")
        else:
            return _kernels().attention(q, k, v, causal=True, window=window, scale=scale), None
    drop = dropout_p if training else 0.0
    if window is None or window >= T:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True, scale=scale), None
    index = torch.arange(T, device=q.device)
    mask = band_mask(index, index, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=scale), None


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float,
    backend: str,
    return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with an explicit boolean mask (True = may attend), used with the KV cache
    and with padded batches. ``mask=None`` means every key is visible. The fused kernel has
    no arbitrary masks, so ``triton`` takes the ``sdpa`` path here.
    """
    if return_probs or backend == "math":
        if mask is None:
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
        out, probs = _math_attention(q, k, v, mask, scale, 0.0, False)
        return out, (probs if return_probs else None)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, backend: str
) -> torch.Tensor:
    """LayerNorm over the last dimension, fused by Triton when the backend asks for it."""
    if backend == "triton" and _triton_usable(x):
        return _kernels().layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
