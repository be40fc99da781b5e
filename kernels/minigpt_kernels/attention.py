"""Flash-style fused attention in Triton: causal dense, causal banded and non-causal.

    O = softmax(scale * Q K^T + M) V          Q, K, V, O: (B, H, T, D)

where the mask M is 0 where query ``i`` may see key ``j`` and -inf elsewhere:

    causal dense      j <= i
    causal banded     i - w < j <= i          (window w; GPT-Neo's local layers)
    non-causal        every j

The T x T score matrix is never materialised. The forward pass streams tiles of K
and V past a tile of Q with the online softmax of FlashAttention (Dao et al. 2022,
Alg. 1; Milakov & Gimelshein 2018): a running row max ``m`` and row sum ``l`` are
rescaled whenever the max grows, and the output is divided by ``l`` once at the
end. Scores are kept in base 2, ``s2 = s * scale * log2(e)``, so every
exponential is one ``exp2`` (``e^x = 2^(x log2 e)``). The forward saves the
per-row log-sum-exp (in the same base-2 units); the backward (FlashAttention-2,
Dao 2023, Alg. 2) recomputes each probability tile from it:

    P   = exp2(s2 - lse2)
    dV  = P^T dO
    dP  = dO V^T
    dS  = P * (dP - delta),  delta_i = sum_d dO_id O_id     (softmax backward)
    dQ  = scale * dS K,      dK = scale * dS^T Q

One kernel owns each output tile, so there are no atomics: a dK/dV kernel loops
over query tiles, a dQ kernel loops over key tiles.

Which tiles are visited is decided by two small helpers, ``_key_tile_segments``
(for a query tile) and ``_query_tile_segments`` (for a key tile). They return
the tile range as three consecutive segments: masked, unmasked, masked. Only the
tiles that cut the diagonal, the band's lower edge or the sequence end need the
element-wise mask; tiles strictly inside the allowed region skip it. In banded
mode the range covers only the tiles that meet the band, so the work grows as
T * w instead of T^2. ``key_tile_segments`` and ``query_tile_segments`` run the
very same helpers in plain Python, for tests and for counting work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minigpt_kernels._common import check_device, check_dtype, interpreter_enabled, new_buffer

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
# Every multiple of 8 from 16 to 256. Inside the kernels D is padded to the next power of
# two (tl.arange needs one) with masked loads and stores, as FlashAttention-2 does for
# head dims such as 80 and 96 (Dao 2023; its Triton version's EVEN_HEADDIM): the padded
# columns load as zeros, so they add nothing to Q K^T, and are never stored.
SUPPORTED_HEAD_DIMS = tuple(range(16, 257, 8))


# ---------------------------------------------------------------------------
# Tile bookkeeping (shared by the kernels and by Python)
# ---------------------------------------------------------------------------


@triton.jit
def _key_tile_segments(
    start_m, seq_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr
):
    # Key tiles that a query tile [start_m, start_m + BLOCK_M) must visit, as
    # (lo, mid_lo, mid_hi, hi): [lo, mid_lo) masked, [mid_lo, mid_hi) unmasked,
    # [mid_hi, hi) masked. Every boundary except hi is a multiple of BLOCK_N.
    # A tile is unmasked only if every (query, key) pair in it is allowed for the
    # query rows below seq_len (rows past the end are never stored).
    if CAUSAL:
        hi = min(start_m + BLOCK_M, seq_len)  # keys after the tile's last query are masked
        mid_hi = (start_m + 1) // BLOCK_N * BLOCK_N  # tiles ending at or before the first query
        if WINDOW > 0:
            # The first query sees keys from start_m - WINDOW + 1; the last query
            # sees every key of a tile starting at or after start_m + BLOCK_M - WINDOW.
            lo = max(start_m - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
            mid_lo = (max(start_m + BLOCK_M - WINDOW, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
            mid_lo = min(mid_lo, mid_hi)
        else:
            lo = 0
            mid_lo = 0
    else:
        lo = 0
        mid_lo = 0
        mid_hi = seq_len // BLOCK_N * BLOCK_N  # only the ragged last tile needs a mask
        hi = seq_len
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _query_tile_segments(
    start_n, seq_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr
):
    # Query tiles that see some key of the tile [start_n, start_n + BLOCK_N), as
    # (lo, mid_lo, mid_hi, hi) like _key_tile_segments, stepping by BLOCK_M.
    # Here a tile is unmasked only if all its query rows are below seq_len: a
    # padding row would otherwise leak into this key tile's dK and dV.
    full_rows_end = seq_len // BLOCK_M * BLOCK_M
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M  # queries before the tile's first key see none of it
        # Unmasked needs the tile's first query at or after the last key.
        mid_lo = (start_n + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        if WINDOW > 0:
            # The last key start_n + BLOCK_N - 1 is seen up to query start_n + BLOCK_N - 2 + WINDOW;
            # the first key start_n by every query up to start_n + WINDOW - 1.
            hi = min(start_n + BLOCK_N - 1 + WINDOW, seq_len)
            mid_hi = min((start_n + WINDOW) // BLOCK_M * BLOCK_M, full_rows_end)
        else:
            hi = seq_len
            mid_hi = full_rows_end
        mid_lo = min(mid_lo, hi)
        mid_hi = min(max(mid_hi, mid_lo), hi)
    else:
        lo = 0
        mid_lo = 0
        mid_hi = full_rows_end
        hi = seq_len
    return lo, mid_lo, mid_hi, hi


def key_tile_segments(
    start_m: int, seq_len: int, block_m: int, block_n: int, causal: bool, window: int | None
) -> tuple[int, int, int, int]:
    """Key-tile loop bounds of the query tile starting at ``start_m``, computed in Python.

    Runs the same function the forward and dQ kernels run. Returns
    ``(lo, mid_lo, mid_hi, hi)``: key tiles start at ``lo, lo + block_n, ...`` below
    ``hi``; those in ``[mid_lo, mid_hi)`` are visited without an element-wise mask.
    """
    return _key_tile_segments.fn(start_m, seq_len, block_m, block_n, causal, window or 0)


def query_tile_segments(
    start_n: int, seq_len: int, block_m: int, block_n: int, causal: bool, window: int | None
) -> tuple[int, int, int, int]:
    """Query-tile loop bounds of the key tile starting at ``start_n``, computed in Python.

    Runs the same function the dK/dV kernel runs; see ``key_tile_segments``.
    """
    return _query_tile_segments.fn(start_n, seq_len, block_m, block_n, causal, window or 0)


@triton.jit
def _load_tile(ptrs, rows_ok, d_ok, MASK_ROWS: tl.constexpr, PAD_D: tl.constexpr):
    # Load a tile, zero-filling rows past the sequence end (MASK_ROWS) and the padding
    # columns between HEAD_DIM and BLOCK_D (PAD_D). rows_ok and d_ok broadcast against
    # ptrs; a power-of-two head dim and an interior tile load without any mask.
    if MASK_ROWS:
        if PAD_D:
            return tl.load(ptrs, mask=rows_ok & d_ok, other=0.0)
        return tl.load(ptrs, mask=rows_ok, other=0.0)
    if PAD_D:
        return tl.load(ptrs, mask=d_ok, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _attention_mask(rows, cols, seq_len, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    # True where query `rows` may see key `cols` (both broadcastable index blocks).
    allowed = (rows < seq_len) & (cols < seq_len)
    if CAUSAL:
        allowed = allowed & (cols <= rows)
    if WINDOW > 0:
        allowed = allowed & (cols > rows - WINDOW)
    return allowed


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


@triton.jit
def _attention_fwd_tiles(
    acc, l_i, m_i, q,
    K_ptr, V_ptr,
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, d_ok, seq_len, qk_scale, lo, hi,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    MASKED: tl.constexpr, PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Online softmax over the key tiles [lo, hi) for one query tile:
    #   m' = max(m, rowmax(s2)),  alpha = 2^(m - m'),  P = 2^(s2 - m')
    #   l' = alpha * l + rowsum(P),  acc' = alpha * acc + P V
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT_ptrs = K_ptr + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd  # (D, BLOCK_N)
        v_ptrs = V_ptr + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd  # (BLOCK_N, D)
        key_ok = offs_n < seq_len
        kT = _load_tile(kT_ptrs, key_ok[None, :], d_ok[:, None], MASKED, PAD_D)
        v = _load_tile(v_ptrs, key_ok[:, None], d_ok[None, :], MASKED, PAD_D)
        s2 = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            allowed = _attention_mask(offs_m[:, None], offs_n[None, :], seq_len, CAUSAL, WINDOW)
            s2 = tl.where(allowed, s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        if MASKED:
            # A row that has seen no allowed key yet keeps m = -inf; shift it by 0
            # instead so that 2^(-inf - -inf) never produces a NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_shift = m_new
        p = tl.exp2(s2 - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, O_ptr, LSE_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    n_heads, seq_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program computes BLOCK_M rows of O for one (batch, head):
    #   O[i] = sum_j 2^(s2_ij - lse2_i) V[j],  s2_ij = (Q[i] . K[j]) * scale * log2(e)
    # and stores lse2_i = log2 sum_j 2^(s2_ij) (the log-sum-exp in base 2) for the backward.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    Q_ptr += off_b * stride_qb + off_h * stride_qh
    K_ptr += off_b * stride_kb + off_h * stride_kh
    V_ptr += off_b * stride_vb + off_h * stride_vh
    O_ptr += off_b * stride_ob + off_h * stride_oh
    LSE_ptr += pid_bh.to(tl.int64) * seq_len

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)  # HEAD_DIM padded to a power of two; columns >= HEAD_DIM are masked
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len
    q = tl.load(Q_ptr + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _key_tile_segments(start_m, seq_len, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    acc, l_i, m_i = _attention_fwd_tiles(
        acc, l_i, m_i, q, K_ptr, V_ptr, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, offs_d, d_ok, seq_len, qk_scale, lo, mid_lo,
        BLOCK_N, CAUSAL, WINDOW, True, BLOCK_D != HEAD_DIM, DOT_PRECISION)
    acc, l_i, m_i = _attention_fwd_tiles(
        acc, l_i, m_i, q, K_ptr, V_ptr, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, offs_d, d_ok, seq_len, qk_scale, mid_lo, mid_hi,
        BLOCK_N, CAUSAL, WINDOW, False, BLOCK_D != HEAD_DIM, DOT_PRECISION)
    acc, l_i, m_i = _attention_fwd_tiles(
        acc, l_i, m_i, q, K_ptr, V_ptr, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, offs_d, d_ok, seq_len, qk_scale, mid_hi, hi,
        BLOCK_N, CAUSAL, WINDOW, True, BLOCK_D != HEAD_DIM, DOT_PRECISION)

    l_i = tl.where(row_ok, l_i, 1.0)  # padding rows may have seen no key; keep them finite
    o = acc / l_i[:, None]
    tl.store(O_ptr + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             o.to(O_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE_ptr + offs_m, m_i + tl.log2(l_i), mask=row_ok)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------


@triton.jit
def _attention_bwd_preprocess_kernel(
    O_ptr, dO_ptr, Delta_ptr,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    n_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta_i = sum_d dO[i, d] * O[i, d]  (= sum_j P_ij dP_ij, the softmax-backward
    # correction). One program handles BLOCK_M rows of one (batch, head).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    O_ptr += off_b * stride_ob + off_h * stride_oh
    dO_ptr += off_b * stride_dob + off_h * stride_doh
    Delta_ptr += pid_bh.to(tl.int64) * seq_len

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)  # HEAD_DIM padded to a power of two; columns >= HEAD_DIM are masked
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len
    o = tl.load(O_ptr + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(dO_ptr + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta_ptr + offs_m, delta, mask=row_ok)


@triton.jit
def _attention_bwd_dkdv_tiles(
    dk, dv, k, v,
    Q_ptr, dO_ptr, LSE_ptr, Delta_ptr,
    stride_qt, stride_qd, stride_dot, stride_dod,
    offs_n, offs_d, d_ok, seq_len, qk_scale, lo, hi,
    BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    MASKED: tl.constexpr, PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Accumulate dV += P^T dO and dK += dS^T Q (unscaled) over the query tiles [lo, hi),
    # working with transposed tiles so that the key tile stays the row dimension.
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qT_ptrs = Q_ptr + offs_m[None, :] * stride_qt + offs_d[:, None] * stride_qd  # (D, BLOCK_M)
        do_ptrs = dO_ptr + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod  # (BLOCK_M, D)
        row_ok = offs_m < seq_len
        qT = _load_tile(qT_ptrs, row_ok[None, :], d_ok[:, None], MASKED, PAD_D)
        do = _load_tile(do_ptrs, row_ok[:, None], d_ok[None, :], MASKED, PAD_D)
        if MASKED:
            lse2 = tl.load(LSE_ptr + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(Delta_ptr + offs_m, mask=row_ok, other=0.0)
        else:
            lse2 = tl.load(LSE_ptr + offs_m)
            delta = tl.load(Delta_ptr + offs_m)
        s2T = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.exp2(s2T - lse2[None, :])
        if MASKED:
            allowed = _attention_mask(offs_m[None, :], offs_n[:, None], seq_len, CAUSAL, WINDOW)
            pT = tl.where(allowed, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr, dO_ptr, LSE_ptr, Delta_ptr, dK_ptr, dV_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    n_heads, seq_len, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program computes BLOCK_N rows of dK and dV for one (batch, head):
    #   dV[j] = sum_i P_ij dO[i],   dK[j] = scale * sum_i dS_ij Q[i]
    # looping over the query tiles that can see these keys. dK and dV share strides
    # (the launcher allocates them alike).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    Q_ptr += off_b * stride_qb + off_h * stride_qh
    K_ptr += off_b * stride_kb + off_h * stride_kh
    V_ptr += off_b * stride_vb + off_h * stride_vh
    dO_ptr += off_b * stride_dob + off_h * stride_doh
    dK_ptr += off_b * stride_dkb + off_h * stride_dkh
    dV_ptr += off_b * stride_dkb + off_h * stride_dkh
    LSE_ptr += pid_bh.to(tl.int64) * seq_len
    Delta_ptr += pid_bh.to(tl.int64) * seq_len

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)  # HEAD_DIM padded to a power of two; columns >= HEAD_DIM are masked
    d_ok = offs_d < HEAD_DIM
    key_ok = offs_n < seq_len
    k = tl.load(K_ptr + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=key_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V_ptr + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=key_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _query_tile_segments(start_n, seq_len, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    dk, dv = _attention_bwd_dkdv_tiles(
        dk, dv, k, v, Q_ptr, dO_ptr, LSE_ptr, Delta_ptr,
        stride_qt, stride_qd, stride_dot, stride_dod,
        offs_n, offs_d, d_ok, seq_len, qk_scale, lo, mid_lo,
        BLOCK_M, CAUSAL, WINDOW, True, BLOCK_D != HEAD_DIM, DOT_PRECISION)
    dk, dv = _attention_bwd_dkdv_tiles(
        dk, dv, k, v, Q_ptr, dO_ptr, LSE_ptr, Delta_ptr,
        stride_qt, stride_qd, stride_dot, stride_dod,
        offs_n, offs_d, d_ok, seq_len, qk_scale, mid_lo, mid_hi,
        BLOCK_M, CAUSAL, WINDOW, False, BLOCK_D != HEAD_DIM, DOT_PRECISION)
    dk, dv = _attention_bwd_dkdv_tiles(
        dk, dv, k, v, Q_ptr, dO_ptr, LSE_ptr, Delta_ptr,
        stride_qt, stride_qd, stride_dot, stride_dod,
        offs_n, offs_d, d_ok, seq_len, qk_scale, mid_hi, hi,
        BLOCK_M, CAUSAL, WINDOW, True, BLOCK_D != HEAD_DIM, DOT_PRECISION)

    dk = dk * sm_scale
    out_offs = offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd
    out_ok = key_ok[:, None] & d_ok[None, :]
    tl.store(dK_ptr + out_offs, dk.to(dK_ptr.dtype.element_ty), mask=out_ok)
    tl.store(dV_ptr + out_offs, dv.to(dV_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _attention_bwd_dq_tiles(
    dq, q, do, lse2, delta,
    K_ptr, V_ptr,
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, d_ok, seq_len, qk_scale, lo, hi,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    MASKED: tl.constexpr, PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Accumulate dQ += dS K (unscaled) over the key tiles [lo, hi).
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT_ptrs = K_ptr + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd  # (D, BLOCK_N)
        vT_ptrs = V_ptr + offs_n[None, :] * stride_vt + offs_d[:, None] * stride_vd  # (D, BLOCK_N)
        key_ok = offs_n < seq_len
        kT = _load_tile(kT_ptrs, key_ok[None, :], d_ok[:, None], MASKED, PAD_D)
        vT = _load_tile(vT_ptrs, key_ok[None, :], d_ok[:, None], MASKED, PAD_D)
        s2 = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s2 - lse2[:, None])
        if MASKED:
            allowed = _attention_mask(offs_m[:, None], offs_n[None, :], seq_len, CAUSAL, WINDOW)
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, dO_ptr, LSE_ptr, Delta_ptr, dQ_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    n_heads, seq_len, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program computes BLOCK_M rows of dQ for one (batch, head):
    #   dQ[i] = scale * sum_j P_ij (dP_ij - delta_i) K[j],  dP_ij = dO[i] . V[j]
    # looping over the same key tiles as the forward pass.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    Q_ptr += off_b * stride_qb + off_h * stride_qh
    K_ptr += off_b * stride_kb + off_h * stride_kh
    V_ptr += off_b * stride_vb + off_h * stride_vh
    dO_ptr += off_b * stride_dob + off_h * stride_doh
    dQ_ptr += off_b * stride_dqb + off_h * stride_dqh
    LSE_ptr += pid_bh.to(tl.int64) * seq_len
    Delta_ptr += pid_bh.to(tl.int64) * seq_len

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)  # HEAD_DIM padded to a power of two; columns >= HEAD_DIM are masked
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len
    q = tl.load(Q_ptr + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(dO_ptr + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    lse2 = tl.load(LSE_ptr + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta_ptr + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _key_tile_segments(start_m, seq_len, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    dq = _attention_bwd_dq_tiles(
        dq, q, do, lse2, delta, K_ptr, V_ptr, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, offs_d, d_ok, seq_len, qk_scale, lo, mid_lo,
        BLOCK_N, CAUSAL, WINDOW, True, BLOCK_D != HEAD_DIM, DOT_PRECISION)
    dq = _attention_bwd_dq_tiles(
        dq, q, do, lse2, delta, K_ptr, V_ptr, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, offs_d, d_ok, seq_len, qk_scale, mid_lo, mid_hi,
        BLOCK_N, CAUSAL, WINDOW, False, BLOCK_D != HEAD_DIM, DOT_PRECISION)
    dq = _attention_bwd_dq_tiles(
        dq, q, do, lse2, delta, K_ptr, V_ptr, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, offs_d, d_ok, seq_len, qk_scale, mid_hi, hi,
        BLOCK_N, CAUSAL, WINDOW, True, BLOCK_D != HEAD_DIM, DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(dQ_ptr + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(dQ_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of one kernel.

    ``block_m`` counts query rows and ``block_n`` key rows, in every kernel.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class AttentionTiles:
    """Launch configuration of the three attention kernels for one (head_dim, dtype)."""

    fwd: TileConfig
    bwd_dkdv: TileConfig
    bwd_dq: TileConfig


def attention_tiles(head_dim: int, dtype: torch.dtype, interpreter: bool | None = None) -> AttentionTiles:
    """Pick tiles by head_dim and dtype, without autotuning.

    Under Triton's interpreter small tiles keep the CPU tests fast; the forward
    and dQ tiles have ``block_m != block_n`` there on purpose, like on the GPU, so
    that the tests exercise the segment arithmetic for unequal tiles.

    On the GPU, 16-bit inputs use the usual FlashAttention-2 shapes: wide query
    tiles in the forward and dQ passes, wide key tiles in the dK/dV pass. float32
    inputs take the CUDA-core path ("ieee" dot), which needs far more registers per
    tile, so their tiles are small. The choices were made by compiling for sm_90
    (Triton 3.6 and 3.9) and keeping configurations that do not spill registers;
    they have not been tuned by timing. Head dims above 128 (D padded up to 256) take
    smaller tiles: a 32x64 dK/dV tile spills 328 bytes at D=256 under Triton 3.9.
    ``scripts/compile_table.py`` writes the registers and spills of every choice.
    """
    if interpreter is None:
        interpreter = interpreter_enabled()
    if interpreter:
        return AttentionTiles(
            fwd=TileConfig(32, 16), bwd_dkdv=TileConfig(16, 32), bwd_dq=TileConfig(32, 16)
        )
    if dtype == torch.float32:
        if head_dim <= 64:
            return AttentionTiles(
                fwd=TileConfig(64, 32, 8, 1), bwd_dkdv=TileConfig(16, 32, 8, 2), bwd_dq=TileConfig(32, 32, 4, 1)
            )
        if head_dim > 128:
            return AttentionTiles(
                fwd=TileConfig(16, 16, 4, 1), bwd_dkdv=TileConfig(16, 16, 8, 1), bwd_dq=TileConfig(16, 16, 4, 1)
            )
        return AttentionTiles(
            fwd=TileConfig(16, 16, 8, 1), bwd_dkdv=TileConfig(16, 32, 8, 2), bwd_dq=TileConfig(16, 16, 8, 1)
        )
    if head_dim <= 64:
        return AttentionTiles(
            fwd=TileConfig(128, 64, 8, 3), bwd_dkdv=TileConfig(32, 128, 8, 3), bwd_dq=TileConfig(128, 32, 4, 3)
        )
    if head_dim <= 128:
        return AttentionTiles(
            fwd=TileConfig(128, 64, 8, 3), bwd_dkdv=TileConfig(32, 128, 8, 3), bwd_dq=TileConfig(128, 32, 8, 3)
        )
    return AttentionTiles(
        fwd=TileConfig(64, 64, 8, 2), bwd_dkdv=TileConfig(32, 32, 8, 2), bwd_dq=TileConfig(64, 32, 8, 2)
    )


def _block_d(head_dim: int) -> int:
    # The column tile: head_dim rounded up to a power of two (tl.arange needs one).
    return triton.next_power_of_2(head_dim)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs would otherwise run through TF32 tensor cores (10-bit mantissa)
    # and miss the float32 tolerance; "ieee" keeps them exact. 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _new_attention_buffer(like: torch.Tensor) -> torch.Tensor:
    # A (B, H, T, D) tensor laid out in memory as (B, T, H, D): the layout the model
    # wants to merge heads back into (B, T, C) without a copy. It is a tensor of
    # its own, not a view, so callers may still modify the output in place.
    B, H, T, D = like.shape
    return new_buffer((B, H, T, D), like.dtype, like.device, strides=(T * H * D, D, H * D, 1))


def _check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; attention expects 4 dims (B, H, T, D)")
        check_device(name, t)
        check_dtype(name, t)
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name}.shape={tuple(t.shape)} must equal q.shape={tuple(q.shape)}; "
                f"this kernel is self-attention with one K/V head per query head"
            )
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype={t.dtype} must equal q.dtype={q.dtype}; cast them to one dtype")
        if t.device != q.device:
            raise ValueError(f"{name}.device={t.device} must equal q.device={q.device}")
    B, H, T, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim={D} is not supported; use a multiple of 8 from 16 to 256 "
            f"(e.g. 64, 80, 96, 128, 256): SUPPORTED_HEAD_DIMS={SUPPORTED_HEAD_DIMS}"
        )
    if B == 0 or H == 0 or T == 0:
        raise ValueError(f"q.shape={tuple(q.shape)} has an empty dimension; B, H and T must be >= 1")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise ValueError(f"window={window!r} must be an int >= 1 or None (dense)")
        if window < 1:
            raise ValueError(f"window={window} must be >= 1 (query i sees keys i-w < j <= i), or None for dense")
        if not causal:
            raise ValueError(
                f"window={window} with causal=False is not supported; banded attention is causal, "
                f"so pass causal=True, or window=None for non-causal dense attention"
            )


def _resolve_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None, scale: float | None,
    tiles: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, allocate and launch the forward kernel. Returns (O, LSE2).

    O is (B, H, T, D) in q.dtype (laid out as (B, T, H, D)); LSE2 is the base-2
    log-sum-exp of the scaled scores, (B, H, T) float32. ``tiles`` overrides
    ``attention_tiles`` (benchmarks/bench_attention_tiles.py sweeps it).
    """
    _check_attention_inputs(q, k, v, causal, window)
    B, H, T, D = q.shape
    scale = _resolve_scale(scale, D)
    tiles = tiles or attention_tiles(D, q.dtype).fwd
    o = _new_attention_buffer(q)
    lse = new_buffer((B, H, T), torch.float32, q.device)
    grid = (triton.cdiv(T, tiles.block_m), B * H)
    _attention_fwd_kernel[grid](
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, T, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        CAUSAL=causal, WINDOW=window or 0, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return o, lse


def _attention_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    do: torch.Tensor, causal: bool, window: int | None, scale: float, tiles: AttentionTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the three backward kernels. Returns (dQ, dK, dV), each (B, H, T, D) in q.dtype.

    ``do`` may have any strides (autograd hands over whatever the next op produced).
    ``tiles`` overrides ``attention_tiles``.
    """
    if do.shape != q.shape or do.dtype != q.dtype or do.device != q.device:
        raise ValueError(
            f"grad_output has shape {tuple(do.shape)}, dtype {do.dtype}, device {do.device}; "
            f"expected {tuple(q.shape)}, {q.dtype}, {q.device} like the attention output"
        )
    tiles = tiles or attention_tiles(q.shape[-1], q.dtype)
    delta = _attention_bwd_preprocess(o, do, tiles.bwd_dq)
    dk, dv = _attention_bwd_dkdv(q, k, v, do, lse, delta, causal, window, scale, tiles.bwd_dkdv)
    dq = _attention_bwd_dq(q, k, v, do, lse, delta, causal, window, scale, tiles.bwd_dq)
    return dq, dk, dv


def _attention_bwd_preprocess(o: torch.Tensor, do: torch.Tensor, cfg: TileConfig) -> torch.Tensor:
    """Delta = rowsum(O * dO), (B, H, T) float32: the dS correction both passes need."""
    B, H, T, D = o.shape
    delta = new_buffer((B, H, T), torch.float32, o.device)
    _attention_bwd_preprocess_kernel[(triton.cdiv(T, cfg.block_m), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, T,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=cfg.block_m, num_warps=cfg.num_warps,
    )
    return delta


def _attention_bwd_dkdv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
    causal: bool, window: int | None, scale: float, cfg: TileConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dK/dV pass, one program per key tile. Returns (dK, dV)."""
    B, H, T, D = q.shape
    dk = _new_attention_buffer(q)
    dv = _new_attention_buffer(q)
    _attention_bwd_dkdv_kernel[(triton.cdiv(T, cfg.block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
        H, T, scale * LOG2E, scale,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, WINDOW=window or 0, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dk, dv


def _attention_bwd_dq(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
    causal: bool, window: int | None, scale: float, cfg: TileConfig,
) -> torch.Tensor:
    """The dQ pass, one program per query tile. Returns dQ."""
    B, H, T, D = q.shape
    dq = _new_attention_buffer(q)
    _attention_bwd_dq_kernel[(triton.cdiv(T, cfg.block_m), B * H)](
        q, k, v, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, T, scale * LOG2E, scale,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, WINDOW=window or 0, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq


# ---------------------------------------------------------------------------
# Autograd and public API
# ---------------------------------------------------------------------------


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None, scale: float | None
    ) -> torch.Tensor:
        o, lse = _attention_fwd(q, k, v, causal, window, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.window, ctx.scale = causal, window, _resolve_scale(scale, q.shape[-1])
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _attention_bwd(q, k, v, o, lse, do, ctx.causal, ctx.window, ctx.scale)
        return dq, dk, dv, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Fused scaled-dot-product attention, differentiable in q, k and v.

    Args:
        q, k, v: (B, H, T, D) tensors with identical shape, dtype and device. Any
            strides are fine (e.g. transposed views of a (B, T, H, D) tensor); they
            are passed to the kernels, never copied.
        causal: query ``i`` sees only keys ``j <= i``. ``causal=False`` (without a
            window) is dense bidirectional attention.
        window: banded causal attention: query ``i`` sees keys ``j`` with
            ``i - window < j <= i``. ``None`` means dense.
        scale: softmax scale; ``None`` means ``1/sqrt(D)`` (GPT-Neo uses 1.0).

    Returns:
        (B, H, T, D) tensor in q's dtype, laid out in memory as (B, T, H, D), so
        ``out.transpose(1, 2)`` is contiguous. Accumulation is in float32.

    Supported: CUDA tensors (CPU only under ``TRITON_INTERPRET=1``); float32,
    float16 and bfloat16; head_dim in ``SUPPORTED_HEAD_DIMS`` (every multiple of 8 from 16
    to 256; the kernels pad it to a power of two internally, without copying inputs); any T >= 1.

    Raises:
        ValueError: on an unsupported device, dtype or head_dim, mismatched shapes,
            dtypes or devices, an empty dimension, ``window < 1``, or a window with
            ``causal=False``.
    """
    return _AttentionFunction.apply(q, k, v, bool(causal), window, scale)
