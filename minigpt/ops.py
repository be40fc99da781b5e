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

A banded layer costs O(T * w) on every backend. ``triton`` visits only the key tiles
that meet the band; ``sdpa`` and ``math`` cut the queries into blocks of w rows, and
block b attends to the 2w keys of blocks b-1 and b, the only keys its queries can see
(``banded_attention``). No T x T mask or score matrix is built, except on the ``math``
path when attention probabilities are asked for.
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
    _log_once(
        f"the Triton attention kernel supports head_dim in {supported[0]}..{supported[-1]} "
        f"(multiples of 8), not {head_dim}; using 'sdpa' for attention"
    )
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


def _band_block_mask(
    n_blocks: int, window: int, first_key: int, start: int, left_pad: torch.Tensor | None, n_head: int, device
) -> torch.Tensor:
    """Boolean mask of the blocked band, (n_blocks, 1, w, 2w), or (n_blocks, B*H, w, 2w) with left padding.

    Positions are in query coordinates: row r of block b is query i = b*w + r, column c
    is key j = (b-1)*w + c. Keys before ``first_key`` do not exist (zero padding), and
    with ``left_pad`` a padding query sees itself only, as in ``build_mask``.
    """
    w = window
    b = torch.arange(n_blocks, device=device)[:, None, None]
    i = b * w + torch.arange(w, device=device)[None, :, None]  # (n, w, 1)
    j = (b - 1) * w + torch.arange(2 * w, device=device)[None, None, :]  # (n, 1, 2w)
    mask = (j <= i) & (j > i - w) & (j >= first_key)  # (n, w, 2w)
    if left_pad is None:
        return mask[:, None]  # (n, 1, w, 2w)
    real_key = (start + j)[:, None] >= left_pad[None, :, None, None]  # (n, B, 1, 2w)
    mask = (mask[:, None] & real_key) | (j == i)[:, None]  # (n, B, w, 2w)
    return mask.repeat_interleave(n_head, dim=1)  # (n, B*H, w, 2w)


@functools.lru_cache(maxsize=4)
def _band_block_bias(
    n_blocks: int, window: int, first_key: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    # The additive form (0 / -inf) of the band's mask, (n, 1, w, 2w): 2*T*w values, the size
    # of one head's scores. PyTorch's CPU SDPA kernel runs a float mask faster than a boolean
    # one. Cached: every banded layer of every step asks for the same one.
    mask = _band_block_mask(n_blocks, window, first_key, 0, None, 1, device)
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))


def _attend(q, k, v, mask, scale, backend, dropout_p, training):
    # Attention of each block's queries to its keys; the mask (boolean, or an additive float
    # bias for sdpa) broadcasts over the leading dims.
    drop = dropout_p if training else 0.0
    if backend == "math":
        mask = mask if mask.dtype == torch.bool else mask == 0
        return _math_attention(q, k, v, mask, scale, drop, training)[0]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=scale)


def _overlapping_blocks(rows: torch.Tensor, w: int) -> torch.Tensor:
    """(B*H, (n+1)w, D) -> (n, B*H, 2w, D): block b holds rows bw .. bw+2w-1 (key blocks b-1 and b).

    Without autograd these are overlapping views (unfold), which SDPA reads as fast as
    copies; with autograd they are copies (cat), since unfold's backward is several times
    slower than cat's.
    """
    if not (torch.is_grad_enabled() and rows.requires_grad):
        return rows.unfold(1, 2 * w, w).permute(1, 0, 3, 2)
    blocks = rows.unflatten(1, (-1, w)).transpose(0, 1)  # (n+1, B*H, w, D)
    return torch.cat([blocks[:-1], blocks[1:]], dim=2)


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    scale: float,
    backend: str,
    start: int = 0,
    left_pad: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Banded causal attention in O(T * w) time and memory, in plain PyTorch.

    q: (B, H, T, D), queries at positions start .. start+T-1. k, v: (B, H, S, D), S >= T,
    keys at consecutive positions start+T-S .. start+T-1 (the last key is the last
    query's own). Query i sees key j iff i - w < j <= i.

    Queries are cut into n = ceil(T / w) blocks of w rows. Block b's queries
    bw .. bw+w-1 see keys from bw-w+1 to bw+w-1, all inside blocks b-1 and b of the
    keys, so each block attends to 2w keys: scores are (n, B*H, w, 2w), not (T, T).
    The keys are zero-padded to cover block -1 and the ragged end; the mask hides them.
    Blocks lead the batch dimensions, so one (n, 1, w, 2w) mask broadcasts over batch
    and heads (left-padded rows get one per row).
    """
    B, H, T, D = q.shape
    S, w = k.shape[-2], window
    n = -(-T // w)  # query blocks
    pad = n * w - T  # rows that fill the last block
    q_rows = F.pad(q, (0, 0, 0, pad)) if pad else q  # (B, H, n*w, D)
    q_blocks = q_rows.reshape(B * H, n, w, D).transpose(0, 1)  # (n, B*H, w, D)
    # Keys in query coordinates: row w + i holds the key at query i's position, for
    # i in [-w, n*w); a negative pad drops keys more than w before the first query.
    k_rows = F.pad(k, (0, 0, w - (S - T), pad)).reshape(B * H, (n + 1) * w, D)  # (B*H, (n+1)w, D)
    v_rows = F.pad(v, (0, 0, w - (S - T), pad)).reshape(B * H, (n + 1) * w, D)
    k_blocks, v_blocks = _overlapping_blocks(k_rows, w), _overlapping_blocks(v_rows, w)  # (n, B*H, 2w, D)
    if left_pad is not None:
        mask = _band_block_mask(n, w, T - S, start, left_pad, H, q.device)  # (n, B*H, w, 2w)
    else:
        first_key = max(T - S, -w)  # keys further back than one block make no difference
        mask = _band_block_bias(n, w, first_key, q.dtype if backend == "sdpa" else torch.float32, q.device)
    out = _attend(q_blocks, k_blocks, v_blocks, mask, scale, backend, dropout_p, training)  # (n, B*H, w, D)
    return out.transpose(0, 1).reshape(B, H, n * w, D)[:, :, :T]  # (B, H, T, D)


def attention_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The math path's first half: (B, H, Tq, D) @ (B, H, D, Tk) -> (B, H, Tq, Tk) float32
    scaled scores, -inf where ``mask`` (broadcastable, True = may attend) is False."""
    scores = (q @ k.transpose(-2, -1)).float() * scale
    return scores.masked_fill(~mask, float("-inf"))


def _math_attention(q, k, v, mask, scale, dropout_p, training):
    # The softmax runs in float32.
    scores = attention_scores(q, k, mask, scale)
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
    if window is not None and window >= T:
        window = None  # the band covers every causal pair
    if return_probs:
        index = torch.arange(T, device=q.device)
        out, probs = _math_attention(q, k, v, band_mask(index, index, window), scale, dropout_p, training)
        return out, probs
    if backend == "triton" and _triton_usable(q) and _kernel_head_dim_ok(q.shape[-1]):
        if not (dropout_p > 0 and training):
            return _kernels().attention(q, k, v, causal=True, window=window, scale=scale), None
        _log_once("the Triton attention kernel has no dropout; using 'sdpa' while dropout > 0 in training")
    if backend == "triton":
        backend = "sdpa"  # the fallback logged above
    if window is not None:
        out = banded_attention(q, k, v, window=window, scale=scale, backend=backend,
                               dropout_p=dropout_p, training=training)
        return out, None
    if backend == "math":
        index = torch.arange(T, device=q.device)
        out, _ = _math_attention(q, k, v, band_mask(index, index, None), scale, dropout_p, training)
        return out, None
    drop = dropout_p if training else 0.0
    return F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True, scale=scale), None


def indexed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    start: int,
    k_index: torch.Tensor,
    window: int | None,
    left_pad: torch.Tensor | None,
    scale: float,
    backend: str,
    return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of queries at positions start .. start+T-1 to keys at ``k_index``.

    Used with the KV cache (decoding, chunked prefill) and with left-padded batches.
    q: (B, H, T, D); k, v: (B, H, S, D); k_index: (S,) absolute positions of the keys,
    which cover the positions start+T-S .. start+T-1 in any order (a banded layer's
    cache is a ring). left_pad: (B,) padding tokens at the start of each row, or None.

    A single query with no padding sees every cached key (the cache holds only those).
    A banded layer with several queries sorts its keys by position and takes the O(T * w)
    ``banded_attention``; anything else builds the (Tq, S) mask.
    """
    T, S = q.shape[-2], k.shape[-2]
    if T == 1 and left_pad is None:
        return masked_attention(q, k, v, None, scale=scale, backend=backend, return_probs=return_probs)
    if window is not None and window < S and not return_probs:
        order = torch.argsort(k_index)  # (S,) the ring's slots in position order
        k, v = k[:, :, order], v[:, :, order]  # (B, H, S, D)
        backend = "math" if backend == "math" else "sdpa"
        out = banded_attention(q, k, v, window=window, scale=scale, backend=backend, start=start, left_pad=left_pad)
        return out, None
    q_index = torch.arange(start, start + T, device=q.device)
    mask = build_mask(q_index, k_index, window, left_pad)
    return masked_attention(q, k, v, mask, scale=scale, backend=backend, return_probs=return_probs)


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
