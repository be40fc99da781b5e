"""The one attention mask rule, and the two forms the PyTorch paths hand to a softmax.

Query i sees key j iff j <= i and, in a banded layer of width w, i - w < j. ``visible``
states it once, on positions that broadcast; every mask the ``math`` and ``sdpa`` paths
build is ``visible`` of some positions: whole rows of positions (``band_mask``), or the
blocked layout of ``minigpt.banded``.

kernels/ never imports minigpt, so the rule has two twins there, which say the same thing:
``minigpt_kernels.reference.attention_mask`` (the reference's (T, T) mask) and the Triton
kernel's inline ``_attention_mask``, evaluated per tile. tests/test_ops_banded.py checks
that the three agree.
"""
from __future__ import annotations

import functools

import torch


def visible(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, left_pad: torch.Tensor | None = None
) -> torch.Tensor:
    """True where the query at position ``q_pos`` may see the key at ``k_pos``.

    q_pos, k_pos: integer tensors that broadcast against each other. window: the band width
    w of a banded layer, or None (dense). left_pad: padding tokens at the start of each
    row, shaped to broadcast with the positions, or None. Keys inside the padding are
    hidden, and a padding query sees itself only, so its softmax row is never empty (its
    output is unused).
    """
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    if left_pad is not None:
        allowed = (allowed & (k_pos >= left_pad)) | (k_pos == q_pos)
    return allowed


def band_mask(
    q_index: torch.Tensor, k_index: torch.Tensor, window: int | None, left_pad: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask of queries at positions ``q_index`` (Tq,) against keys at ``k_index`` (Tk,).

    Returns (Tq, Tk), or (B, 1, Tq, Tk) with ``left_pad`` (B,) padding tokens per row (KV
    cache, padded batches); True = may attend.
    """
    if left_pad is None:
        return visible(q_index[:, None], k_index[None, :], window)  # (Tq, Tk)
    mask = visible(q_index[None, :, None], k_index[None, None, :], window, left_pad[:, None, None])  # (B, Tq, Tk)
    return mask[:, None]  # (B, 1, Tq, Tk)


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a boolean mask: 0 where it is True, -inf elsewhere, in ``dtype``.

    PyTorch's CPU SDPA kernel runs a float mask faster than a boolean one.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def cached(build):
    """``build`` behind a small lru_cache, except while torch.compile traces: then the mask is
    built inside the graph (a constant there), and dynamo has no cache wrapper to warn about.
    Every layer of every step asks for the same few masks."""
    cache = functools.lru_cache(maxsize=4)(build)

    @functools.wraps(build)
    def mask(*args):
        return build(*args) if torch.compiler.is_compiling() else cache(*args)
    return mask
