"""The one seam between the model and its compute backends.

Three attention backends agree within stated tolerances:

- ``math``: the readable reference, an explicit masked softmax (and the only path that
  can return attention probabilities);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``;
- ``triton``: the fused kernels in the standalone ``minigpt_kernels`` package, ``kernels/`` (attention and
  LayerNorm). Triton needs CUDA, or ``TRITON_INTERPRET=1`` on a CPU; otherwise the
  model falls back to ``sdpa`` and says so once in the log.

Masks follow the house's single definition: query i sees key j iff j <= i and, in a
banded layer of width w, i - w < j.

A banded layer costs O(T * w) on every backend. ``triton`` visits only the key tiles
that meet the band; ``sdpa`` and ``math`` cut the queries into blocks of b = w/2 rows,
and each block attends to the w + b keys its queries can see (``banded_attention``). No T x T mask or score matrix is built, except on the ``math``
path when attention probabilities are asked for.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("math", "sdpa", "triton")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; choose one of {BACKENDS}")
    return backend


class UsesBackend:
    """Marks a module whose forward calls a backend-dependent op of this file (attention,
    LayerNorm) and hands it `self.backend`. Only `use_backend` sets it on an instance."""

    backend: str = "sdpa"


def use_backend(model: nn.Module, backend: str) -> nn.Module:
    """Compute every attention and LayerNorm of `model` with `backend`; returns `model`.

    backend: 'math', 'sdpa' or 'triton' (see the module docstring). This is the one place
    that chooses it: `GPT(config, backend=...)`, `GPT.set_backend`, `GPT.from_pretrained`
    and the training loop's `parallelize` all call it. The model describes the math; how it
    is computed is applied from outside, as compile and sharding are. The choice
    lives on each `UsesBackend` module rather than in a global, so two models in one
    process may differ and `torch.compile` sees a constant attribute. Works on any module
    that holds GPTs (a classifier around its backbone).

    Raises ValueError for an unknown backend, before changing anything.
    """
    check_backend(backend)
    for module in model.modules():
        if isinstance(module, UsesBackend):
            module.backend = backend
    return model


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
        import minigpt_kernels
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            f"backend='triton' needs the minigpt_kernels package (the repository's kernels/ folder) and Triton: "
            f"{err}. Install minigpt (pip install -e .), or from a checkout put its kernels/ folder on "
            f"PYTHONPATH beside the root (PYTHONPATH=.:kernels)") from err
    return minigpt_kernels


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
    n_blocks: int, block: int, window: int, first_key: int, start: int, left_pad: torch.Tensor | None,
    n_head: int, device
) -> torch.Tensor:
    """Boolean mask of the blocked band, (n_blocks, 1, b, w+b), or (n_blocks, B*H, b, w+b) with left padding.

    Positions are in query coordinates: row r of block m is query i = m*b + r, column c
    is key j = m*b - w + c. Keys before ``first_key`` do not exist (zero padding), and
    with ``left_pad`` a padding query sees itself only, as in ``build_mask``.
    """
    b, w = block, window
    m = torch.arange(n_blocks, device=device)[:, None, None]
    i = m * b + torch.arange(b, device=device)[None, :, None]  # (n, b, 1)
    j = m * b - w + torch.arange(w + b, device=device)[None, None, :]  # (n, 1, w+b)
    mask = (j <= i) & (j > i - w) & (j >= first_key)  # (n, b, w+b)
    if left_pad is None:
        return mask[:, None]  # (n, 1, b, w+b)
    real_key = (start + j)[:, None] >= left_pad[None, :, None, None]  # (n, B, 1, w+b)
    mask = (mask[:, None] & real_key) | (j == i)[:, None]  # (n, B, b, w+b)
    return mask.repeat_interleave(n_head, dim=1)  # (n, B*H, b, w+b)


def _cached_mask(build):
    """`build` behind a small lru_cache, except while torch.compile traces: then the mask is
    built inside the graph (a constant there), and dynamo has no cache wrapper to warn about."""
    cached = functools.lru_cache(maxsize=4)(build)

    @functools.wraps(build)
    def mask(*args):
        return build(*args) if torch.compiler.is_compiling() else cached(*args)
    return mask


@_cached_mask
def _band_block_bias(
    n_blocks: int, block: int, window: int, first_key: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    # The additive form (0 / -inf) of the band's mask, (n, 1, b, w+b): T*(w+b) values, the size
    # of one head's scores. PyTorch's CPU SDPA kernel runs a float mask faster than a boolean
    # one. Cached: every banded layer of every step asks for the same one.
    mask = _band_block_mask(n_blocks, block, window, first_key, 0, None, 1, device)
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))


def scores_whole_band(seq_len: int, window: int) -> bool:
    """Whether the sdpa/math paths score a banded layer's whole (T, T) matrix instead of blocks.

    For T <= 2w the whole band mask is at most 2w*T entries, O(T*w) already, and one call over
    it beats the blocked path's padding and copies (at the tiny recipe's T=64, w=32 a training
    step took 80 ms blocked against 67 ms this way).
    """
    return seq_len <= 2 * window


@_cached_mask
def _full_band_bias(T: int, window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # The additive form (0 / -inf) of the (T, T) band mask, cached like `_band_block_bias`.
    index = torch.arange(T, device=device)
    mask = band_mask(index, index, window)
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


def band_block_size(window: int) -> int:
    """Query block size b for a window w: w/2 when w is even (each query scores w+b = 1.5w
    keys instead of 2w with b = w; measured fastest on CPU, see benchmarks/NOTES.md), else w."""
    return window // 2 if window % 2 == 0 else window


class _OverlappingBlocks(torch.autograd.Function):
    # cat of the w/b + 1 shifted slices of b-row blocks; the backward adds each slice's
    # gradient in place into one zeroed tensor (cat's own backward zero-fills a full-size
    # tensor per slice, and unfold's backward is several times slower still).
    @staticmethod
    def forward(ctx, rows, block, window):
        ctx.block, ctx.window, ctx.rows_shape = block, window, rows.shape
        blocks = rows.unflatten(1, (-1, block)).transpose(0, 1)  # (n + w/b, B*H, b, D)
        n = blocks.shape[0] - window // block
        return torch.cat([blocks[s:s + n] for s in range(window // block + 1)], dim=2)

    @staticmethod
    def backward(ctx, grad):
        b, w = ctx.block, ctx.window
        grad_rows = grad.new_zeros(ctx.rows_shape)
        blocks = grad_rows.unflatten(1, (-1, b)).transpose(0, 1)  # a view
        n = grad.shape[0]
        for s in range(w // b + 1):
            blocks[s:s + n] += grad[:, :, s * b:(s + 1) * b]
        return grad_rows, None, None


def _overlapping_blocks(rows: torch.Tensor, block: int, window: int) -> torch.Tensor:
    """(B*H, n*b + w, D) -> (n, B*H, w+b, D): block m holds rows m*b .. m*b+w+b-1.

    Without autograd these are overlapping views (unfold), which SDPA reads as fast as
    copies; with autograd they are copies (``_OverlappingBlocks``; b divides w), since
    unfold's backward is several times slower.
    """
    b, w = block, window
    if not (torch.is_grad_enabled() and rows.requires_grad):
        return rows.unfold(1, w + b, b).permute(1, 0, 3, 2)
    return _OverlappingBlocks.apply(rows, b, w)


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
    block: int | None = None,
) -> torch.Tensor:
    """Banded causal attention in O(T * w) time and memory, in plain PyTorch.

    q: (B, H, T, D), queries at positions start .. start+T-1. k, v: (B, H, S, D), S >= T,
    keys at consecutive positions start+T-S .. start+T-1 (the last key is the last
    query's own). Query i sees key j iff i - w < j <= i.

    Queries are cut into n = ceil(T / b) blocks of b rows (b = ``block``, a divisor of w;
    by default w/2, see ``band_block_size``). Block m's queries mb .. mb+b-1 see keys
    from mb-w+1 to mb+b-1, all inside the w+b keys mb-w .. mb+b-1, so scores are
    (n, B*H, b, w+b), not (T, T): w+b keys per query (1.5w at b = w/2; 2w at b = w).
    The keys are zero-padded by w in front and to the ragged end; the mask hides them.
    Blocks lead the batch dimensions, so one (n, 1, b, w+b) mask broadcasts over batch
    and heads (left-padded rows get one per row).
    """
    B, H, T, D = q.shape
    S, w = k.shape[-2], window
    b = block or band_block_size(w)
    n = -(-T // b)  # query blocks
    pad = n * b - T  # rows that fill the last block
    q_rows = F.pad(q, (0, 0, 0, pad)) if pad else q  # (B, H, n*b, D)
    q_blocks = q_rows.reshape(B * H, n, b, D).transpose(0, 1)  # (n, B*H, b, D)
    # Keys in query coordinates: row w + i holds the key at query i's position, for
    # i in [-w, n*b); a negative pad drops keys more than w before the first query.
    k_rows = F.pad(k, (0, 0, w - (S - T), pad)).reshape(B * H, n * b + w, D)
    v_rows = F.pad(v, (0, 0, w - (S - T), pad)).reshape(B * H, n * b + w, D)
    k_blocks, v_blocks = _overlapping_blocks(k_rows, b, w), _overlapping_blocks(v_rows, b, w)  # (n, B*H, w+b, D)
    if left_pad is not None:
        mask = _band_block_mask(n, b, w, T - S, start, left_pad, H, q.device)  # (n, B*H, b, w+b)
    else:
        first_key = max(T - S, -w)  # keys further back than w make no difference
        mask = _band_block_bias(n, b, w, first_key, q.dtype if backend == "sdpa" else torch.float32, q.device)
    out = _attend(q_blocks, k_blocks, v_blocks, mask, scale, backend, dropout_p, training)  # (n, B*H, b, D)
    return out.transpose(0, 1).reshape(B, H, n * b, D)[:, :, :T]  # (B, H, T, D)


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
    if window is not None and scores_whole_band(T, window):
        out = _attend(q, k, v, _full_band_bias(T, window, q.dtype if backend == "sdpa" else torch.float32,
                                               q.device), scale, backend, dropout_p, training)
        return out, None
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
        if hasattr(x, "device_mesh"):  # a DTensor: sequence-parallel under tensor parallelism
            return _layer_norm_on_local_rows(x, weight, bias, eps)
        return _kernels().layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _layer_norm_on_local_rows(x, weight, bias, eps: float):
    """The Triton LayerNorm on this rank's rows of a sequence-sharded DTensor `x` (rows are
    normalised independently, so the local result is exact). The replicated gain and bias
    enter as local tensors whose gradients are declared partial sums (`Partial`): each rank
    saw only its rows, and DTensor adds the ranks' shares when the gradient is needed whole."""
    from torch.distributed.tensor import DTensor, Partial

    def local(p):
        return None if p is None else p.to_local(grad_placements=[Partial()] * p.device_mesh.ndim)

    y = _kernels().layer_norm(x.to_local(), local(weight), local(bias), eps)
    return DTensor.from_local(_PlainGradient.apply(y), x.device_mesh, x.placements, run_check=False)


class _PlainGradient(torch.autograd.Function):
    """The identity, whose backward hands on a plain tensor: DTensor delivers a gradient as an
    `AsyncCollectiveTensor` (a collective still in flight), whose memory a kernel launch
    cannot read until it is waited for."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        from torch.distributed._functional_collectives import AsyncCollectiveTensor

        return grad.wait() if isinstance(grad, AsyncCollectiveTensor) else grad
