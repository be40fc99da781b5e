"""Which tiles the attention kernels visit, checked exhaustively in plain Python.

``key_tile_segments`` / ``query_tile_segments`` run the very functions the kernels
call for their loop bounds. These tests check, against the explicit mask, that the
visited tiles cover every allowed (query, key) pair, that every visited tile holds
at least one allowed pair (banded mode visits only tiles that meet the band), that
the tiles skipped by the element-wise mask are entirely allowed, and that banded
work grows as T * w.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from minigpt_kernels.attention import attention_tiles, key_tile_segments, query_tile_segments
from minigpt_kernels.reference import attention_mask

TILES = [(32, 16), (16, 32), (16, 16), (64, 32), (128, 64), (32, 128)]
MODES = [(False, None), (True, None)] + [(True, w) for w in (1, 2, 5, 16, 17, 40, 100)]
LENGTHS = [1, 2, 15, 16, 17, 31, 33, 64, 65, 130]


def _tiles(lo: int, hi: int, step: int) -> list[int]:
    return list(range(lo, hi, step))


def _check_segments(lo, mid_lo, mid_hi, hi, step):
    assert lo <= mid_lo <= mid_hi <= hi
    for bound in (lo, mid_lo, mid_hi):
        assert bound % step == 0 or bound == hi, "segments must start on a tile edge"


@pytest.mark.parametrize("block_m, block_n", TILES)
def test_key_tile_segments_cover_exactly_the_allowed_pairs(block_m, block_n):
    for (causal, window), T in itertools.product(MODES, LENGTHS):
        allowed = attention_mask(T, causal, window)  # (T, T), [query, key]
        for start_m in range(0, T, block_m):
            lo, mid_lo, mid_hi, hi = key_tile_segments(start_m, T, block_m, block_n, causal, window)
            _check_segments(lo, mid_lo, mid_hi, hi, block_n)
            rows = allowed[start_m:start_m + block_m]  # only the rows below T
            visited = torch.zeros(T, dtype=torch.bool)
            for start_n in _tiles(lo, hi, block_n):
                tile = rows[:, start_n:start_n + block_n]
                assert tile.any(), f"key tile {start_n} holds no allowed pair ({causal=}, {window=}, {T=})"
                visited[start_n:start_n + block_n] = True
            for start_n in _tiles(mid_lo, mid_hi, block_n):
                assert start_n + block_n <= T and rows[:, start_n:start_n + block_n].all(), (
                    f"key tile {start_n} is visited unmasked but has masked pairs ({causal=}, {window=}, {T=})"
                )
            assert not (rows & ~visited[None, :]).any(), f"an allowed key was skipped ({causal=}, {window=}, {T=})"


@pytest.mark.parametrize("block_m, block_n", TILES)
def test_query_tile_segments_cover_exactly_the_allowed_pairs(block_m, block_n):
    for (causal, window), T in itertools.product(MODES, LENGTHS):
        allowed = attention_mask(T, causal, window)
        for start_n in range(0, T, block_n):
            lo, mid_lo, mid_hi, hi = query_tile_segments(start_n, T, block_m, block_n, causal, window)
            _check_segments(lo, mid_lo, mid_hi, hi, block_m)
            cols = allowed[:, start_n:start_n + block_n]  # only the keys below T
            visited = torch.zeros(T, dtype=torch.bool)
            for start_m in _tiles(lo, hi, block_m):
                assert cols[start_m:start_m + block_m].any(), f"query tile {start_m} sees none of these keys"
                visited[start_m:start_m + block_m] = True
            for start_m in _tiles(mid_lo, mid_hi, block_m):
                # Unmasked query tiles must also lie wholly below T: padding rows
                # would otherwise leak into dK and dV.
                assert start_m + block_m <= T and cols[start_m:start_m + block_m].all()
            assert not (cols & ~visited[:, None]).any(), f"an allowed query was skipped ({causal=}, {window=}, {T=})"


def _count_key_tiles(T, block_m, block_n, window):
    total = 0
    for start_m in range(0, T, block_m):
        lo, _, _, hi = key_tile_segments(start_m, T, block_m, block_n, True, window)
        total += len(_tiles(lo, hi, block_n))
    return total


def _count_query_tiles(T, block_m, block_n, window):
    total = 0
    for start_n in range(0, T, block_n):
        lo, _, _, hi = query_tile_segments(start_n, T, block_m, block_n, True, window)
        total += len(_tiles(lo, hi, block_m))
    return total


@pytest.mark.parametrize("count", [_count_key_tiles, _count_query_tiles])
def test_banded_attention_visits_order_t_times_w_tiles(count):
    tiles = attention_tiles(128, torch.float16, interpreter=False)
    for cfg in (tiles.fwd, tiles.bwd_dkdv, tiles.bwd_dq):
        bm, bn = cfg.block_m, cfg.block_n
        w = 256
        banded = {T: count(T, bm, bn, w) for T in (4096, 16384)}
        dense = {T: count(T, bm, bn, None) for T in (4096, 16384)}
        # A tile of `outer` rows meets at most (w + outer - 1) / inner + 1 tiles of
        # the band, whatever T is.
        outer, inner = (bm, bn) if count is _count_key_tiles else (bn, bm)
        for T in (4096, 16384):
            assert banded[T] <= (T // outer) * ((w + outer - 1) // inner + 2)
        # Banded work is linear in T (x4 from 4096 to 16384, up to the edge at
        # the start); dense causal work is quadratic (x16).
        assert banded[16384] <= 4.1 * banded[4096]
        assert dense[16384] >= 15 * dense[4096]
        assert dense[4096] >= 4 * banded[4096]
