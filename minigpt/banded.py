"""Banded causal attention in O(T * w) time and memory, in plain PyTorch.

A banded layer of width w lets query i see keys i-w < j <= i (``minigpt.masks.visible``).
The fused kernel visits only the key tiles that meet the band; this module does the same
for the PyTorch paths, in one of two ways:

- T <= 2w (``scores_whole_band``): the whole (T, T) band mask is at most 2w*T entries,
  O(T * w) already, and one call over it is fastest (``whole_band_attention``);
- otherwise queries are cut into blocks of b rows and each block attends to the w + b keys
  its queries can see (``attention``), with a copy-free gather of the overlapping key blocks
  that has its own autograd Function (``_OverlappingBlocks``).

No backend is named here: the caller hands in ``attend(q, k, v, bias)``, attention under an
additive mask (0 / -inf) that broadcasts over the leading dims, and ``minigpt.ops`` decides
whether that is its ``math`` or its ``sdpa`` path.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from minigpt.masks import additive, band_mask, cached, visible

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""attend(q, k, v, bias) -> out: attention of q to k, v under the additive mask ``bias``."""


def band_block_size(window: int) -> int:
    """Query block size b for a window w: w/2 when w is even (each query scores w+b = 1.5w
    keys instead of 2w with b = w; measured fastest on CPU, see benchmarks/NOTES.md), else w."""
    return window // 2 if window % 2 == 0 else window


def scores_whole_band(seq_len: int, window: int) -> bool:
    """Whether a banded layer's whole (T, T) matrix is scored instead of blocks.

    For T <= 2w the whole band mask is at most 2w*T entries, O(T*w) already, and one call over
    it beats the blocked path's padding and copies (at the tiny recipe's T=64, w=32 a training
    step took 80 ms blocked against 67 ms this way).
    """
    return seq_len <= 2 * window


@cached
def _whole_band_bias(T: int, window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    index = torch.arange(T, device=device)
    return additive(band_mask(index, index, window), dtype)  # (T, T)


def whole_band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: Attend, *,
                         window: int) -> torch.Tensor:
    """One ``attend`` over the whole (T, T) band; for T <= 2w (``scores_whole_band``).

    q, k, v: (B, H, T, D); returns (B, H, T, D).
    """
    return attend(q, k, v, _whole_band_bias(q.shape[-2], window, q.dtype, q.device))


def band_block_mask(
    n_blocks: int, block: int, window: int, first_key: int, start: int, left_pad: torch.Tensor | None,
    n_head: int, device
) -> torch.Tensor:
    """Boolean mask of the blocked band, (n_blocks, 1, b, w+b), or (n_blocks, B*H, b, w+b) with left padding.

    Positions are in query coordinates: row r of block m is query i = m*b + r, column c
    is key j = m*b - w + c. Keys before ``first_key`` (<= 0) do not exist (zero padding);
    ``start`` is the first query's position, which the left padding is counted from.
    """
    b, w = block, window
    m = torch.arange(n_blocks, device=device)[:, None, None]
    i = m * b + torch.arange(b, device=device)[None, :, None]  # (n, b, 1)
    j = m * b - w + torch.arange(w + b, device=device)[None, None, :]  # (n, 1, w+b)
    exists = j >= first_key  # (n, 1, w+b)
    if left_pad is None:
        return (visible(i, j, w) & exists)[:, None]  # (n, 1, b, w+b)
    pad = left_pad[None, :, None, None]  # (1, B, 1, 1)
    mask = visible(start + i[:, None], start + j[:, None], w, pad) & exists[:, None]  # (n, B, b, w+b)
    return mask.repeat_interleave(n_head, dim=1)  # (n, B*H, b, w+b)


@cached
def _band_block_bias(
    n_blocks: int, block: int, window: int, first_key: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    # (n, 1, b, w+b): T*(w+b) values, the size of one head's scores.
    return additive(band_block_mask(n_blocks, block, window, first_key, 0, None, 1, device), dtype)


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


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attend: Attend,
    *,
    window: int,
    start: int = 0,
    left_pad: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Banded causal attention in query blocks, O(T * w) for any T.

    q: (B, H, T, D), queries at positions start .. start+T-1. k, v: (B, H, S, D), S >= T,
    keys at consecutive positions start+T-S .. start+T-1 (the last key is the last
    query's own). Query i sees key j iff i - w < j <= i. left_pad: (B,) padding tokens at
    the start of each row, or None. Returns (B, H, T, D).

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
    if left_pad is None:
        first_key = max(T - S, -w)  # keys further back than w make no difference
        bias = _band_block_bias(n, b, w, first_key, q.dtype, q.device)  # (n, 1, b, w+b)
    else:
        bias = additive(band_block_mask(n, b, w, T - S, start, left_pad, H, q.device), q.dtype)  # (n, B*H, b, w+b)
    out = attend(q_blocks, k_blocks, v_blocks, bias)  # (n, B*H, b, D)
    return out.transpose(0, 1).reshape(B, H, n * b, D)[:, :, :T]  # (B, H, T, D)
