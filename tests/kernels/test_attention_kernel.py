"""minigpt_kernels.attention against the float64 reference: forward, dQ, dK and dV.

Without CUDA these run through Triton's interpreter (tests/conftest.py), with
small tiles, so the shapes stay small; with CUDA the same tests run natively and
add bfloat16.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_flash_close, assert_rel_close

from minigpt_kernels import attention, attention_reference
from minigpt_kernels.reference import attention_mask
from minigpt_kernels._common import new_buffer

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
BF16_REASON = "tl.dot on bfloat16 returns garbage under Triton's interpreter; bfloat16 is tested natively on CUDA"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
DTYPE_PARAMS = [
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16", marks=pytest.mark.skipif(not HAS_CUDA, reason=BF16_REASON)),
]


def _inputs(shape, dtype, seed, make=None):
    """q, k, v and an upstream gradient dO, seeded; ``make`` may return strided views."""
    g = torch.Generator().manual_seed(seed)
    if make is None:
        return tuple(torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(4))
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in make(shape, g))


def _check_fwd_bwd(q, k, v, do, causal, window, scale, backward=True):
    """Run kernel and float64 reference on the same inputs; compare O and every gradient."""
    dtype = q.dtype
    qk, kk, vk = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
    out = attention(qk, kk, vk, causal=causal, window=window, scale=scale)
    qr, kr, vr = (t.detach().to(torch.float64).requires_grad_(backward) for t in (q, k, v))
    ref = attention_reference(qr, kr, vr, causal=causal, window=window, scale=scale)
    assert out.dtype == dtype
    assert_rel_close(out, ref, dtype, "out")
    if backward:
        out.backward(do)
        ref.backward(do.to(torch.float64))
        for name, got, want in (("dq", qk.grad, qr.grad), ("dk", kk.grad, kr.grad), ("dv", vk.grad, vr.grad)):
            assert got.dtype == dtype
            assert_rel_close(got, want, dtype, name)


@st.composite
def attention_cases(draw):
    T = draw(st.integers(1, 80))
    mode = draw(st.sampled_from(["causal", "banded", "non-causal"]))
    return dict(
        B=draw(st.integers(1, 2)),
        H=draw(st.integers(1, 2)),
        T=T,
        D=draw(st.sampled_from([16, 24, 32, 48, 64])),
        causal=mode != "non-causal",
        window=draw(st.integers(1, T + 8)) if mode == "banded" else None,
        scale=draw(st.sampled_from([None, 1.0, 0.3])),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**16)),
    )


@given(case=attention_cases())
def test_attention_fwd_matches_reference(case):
    q, k, v, do = _inputs((case["B"], case["H"], case["T"], case["D"]), case["dtype"], case["seed"])
    _check_fwd_bwd(q, k, v, do, case["causal"], case["window"], case["scale"], backward=False)


@given(case=attention_cases())
def test_attention_bwd_matches_reference(case):
    q, k, v, do = _inputs((case["B"], case["H"], case["T"], case["D"]), case["dtype"], case["seed"])
    _check_fwd_bwd(q, k, v, do, case["causal"], case["window"], case["scale"])


# Interpreter tiles are 32x16 (forward, dQ) and 16x32 (dK/dV): these lengths sit on,
# just below and just above tile edges, and below one tile.
@pytest.mark.parametrize("T", [1, 5, 16, 31, 32, 33, 65])
def test_attention_bwd_matches_reference_causal(T):
    q, k, v, do = _inputs((1, 2, T, 16), torch.float32, seed=T)
    _check_fwd_bwd(q, k, v, do, causal=True, window=None, scale=None)


@pytest.mark.parametrize(
    "T, window",
    [(1, 1), (17, 1), (33, 2), (40, 15), (50, 16), (70, 33), (40, 40), (24, 100)],
)
def test_attention_bwd_matches_reference_banded(T, window):
    q, k, v, do = _inputs((1, 2, T, 16), torch.float32, seed=T + window)
    _check_fwd_bwd(q, k, v, do, causal=True, window=window, scale=1.0)


@pytest.mark.parametrize("T", [1, 17, 48])
def test_attention_bwd_matches_reference_non_causal(T):
    q, k, v, do = _inputs((2, 1, T, 32), torch.float32, seed=T)
    _check_fwd_bwd(q, k, v, do, causal=False, window=None, scale=None)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("window", [None, 7])
def test_attention_bwd_matches_reference_low_precision(dtype, window):
    q, k, v, do = _inputs((2, 2, 45, 64), dtype, seed=3)
    _check_fwd_bwd(q, k, v, do, causal=True, window=window, scale=None)


PRESET_HEAD_DIMS = (64, 80, 96, 128)
"""Head dims the presets run: GPT-2 and GPT-Neo 64; GPT-3 large 96, 2.7b 80, xl/6.7b/13b/175b 128."""
PRESET_WINDOW = 256
"""The banded layers' window in GPT-3 and GPT-Neo."""


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("head_dim", PRESET_HEAD_DIMS)
@pytest.mark.parametrize("mask", ["dense", "banded"])
def test_attention_matches_reference_at_every_preset_configuration(dtype, head_dim, mask):
    # Every (dtype, head_dim, mask) the presets train with, forward and backward. Natively
    # (the GPU suite's first command: bfloat16 has never been checked anywhere else) at the
    # GPU launchers' tiles, with the presets' window and a length past it that no tile
    # divides; under the interpreter at its small tiles, the window and length scaled down.
    T, window = (2 * PRESET_WINDOW + 77, PRESET_WINDOW) if HAS_CUDA else (77, 24)
    q, k, v, do = _inputs((1, 2, T, head_dim), dtype, seed=head_dim)
    _check_fwd_bwd(q, k, v, do, causal=True, window=window if mask == "banded" else None, scale=None)


def test_attention_bwd_matches_reference_head_dim_128():
    q, k, v, do = _inputs((1, 1, 40, 128), torch.float32, seed=4)
    _check_fwd_bwd(q, k, v, do, causal=True, window=9, scale=None)


@pytest.mark.parametrize(
    "dtype, head_dim, causal, window",
    [
        (torch.float16, 64, True, None),
        (torch.float16, 64, True, 100),
        (torch.float16, 128, False, None),
        (torch.float32, 128, True, 50),
        (torch.float16, 96, True, 64),
    ],
    ids=["float16-causal", "float16-banded", "float16-non-causal-d128", "float32-banded-d128", "float16-banded-d96"],
)
def test_attention_bwd_matches_reference_with_gpu_tiles(monkeypatch, dtype, head_dim, causal, window):
    # The interpreter normally uses small tiles; run the GPU's tiles (128x64 forward,
    # 32x128 dK/dV, ...) once too, so their segment arithmetic is covered on CPU.
    module = importlib.import_module("minigpt_kernels.attention")
    gpu_tiles = module.attention_tiles
    monkeypatch.setattr(module, "attention_tiles", lambda d, dt, interpreter=None: gpu_tiles(d, dt, interpreter=False))
    q, k, v, do = _inputs((1, 1, 200, head_dim), dtype, seed=8)
    _check_fwd_bwd(q, k, v, do, causal=causal, window=window, scale=None)


def _same_dtype_attention(q, k, v, causal, window):
    # PyTorch's plain attention computed entirely in the inputs' dtype: the baseline of
    # the flash-attention error rule (tests/tolerances.py).
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    scores = scores.masked_fill(~attention_mask(q.shape[-2], causal, window, q.device), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# Head dims that are not powers of two (80, 96: gpt3-2.7b and gpt3-large) and the largest
# (256): the kernels pad D to a power of two with masked loads and stores. A lean subset of
# odd lengths (1, 3, 113, 239, 257) and windows (1, 7, 64, >= T) per head dim.
PADDED_HEAD_DIM_CASES = [
    (80, torch.float32, 113, True, None),
    (80, torch.float16, 257, True, 64),
    (80, torch.float32, 3, False, None),
    (96, torch.float32, 1, True, None),
    (96, torch.float32, 239, True, 7),
    (96, torch.float16, 113, False, None),
    (96, torch.float32, 113, True, 200),
    (256, torch.float16, 3, True, None),
    (256, torch.float32, 113, True, 1),
    (256, torch.float32, 3, True, 64),
    (256, torch.float32, 45, False, None),
]


@pytest.mark.parametrize(
    "head_dim, dtype, T, causal, window", PADDED_HEAD_DIM_CASES,
    ids=[f"d{d}-{str(dt)[6:]}-T{T}-{'non-causal' if not c else 'causal' if w is None else f'w{w}'}"
         for d, dt, T, c, w in PADDED_HEAD_DIM_CASES],
)
def test_attention_bwd_matches_reference_padded_head_dims(head_dim, dtype, T, causal, window):
    q, k, v, do = _inputs((1, 2, T, head_dim), dtype, seed=T + head_dim)
    results = {}
    for name, fn, cast in (
        ("kernel", lambda a, b, c: attention(a, b, c, causal=causal, window=window), dtype),
        ("same-dtype", lambda a, b, c: _same_dtype_attention(a, b, c, causal, window), dtype),
        ("float64", lambda a, b, c: attention_reference(a, b, c, causal=causal, window=window), torch.float64),
    ):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(do.to(cast))
        results[name] = [out] + [t.grad for t in leaves]
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert results["kernel"][i].dtype == dtype
        assert_flash_close(results["kernel"][i], results["float64"][i], results["same-dtype"][i], dtype, name)


def _split_qkv_views(shape, g):
    # The model's layout: one (B, T, 3, H, D) projection, split and transposed into
    # (B, H, T, D) views that are not contiguous and share one storage.
    B, H, T, D = shape
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(DEVICE)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    do = torch.randn(B, T, H, D, generator=g).to(DEVICE).transpose(1, 2)
    return q, k, v, do


@pytest.mark.parametrize("window", [None, 6])
def test_attention_bwd_matches_reference_strided_views(window):
    q, k, v, do = _inputs((2, 3, 21, 16), torch.float32, seed=5, make=_split_qkv_views)
    assert not q.is_contiguous() and not do.is_contiguous()
    _check_fwd_bwd(q, k, v, do, causal=True, window=window, scale=None)


def test_attention_bwd_accepts_broadcast_grad_output():
    # out.sum().backward() hands the kernel a dO with all strides zero.
    q, k, v, _ = _inputs((1, 2, 19, 16), torch.float32, seed=6)
    qk, qr = q.clone().requires_grad_(), q.double().requires_grad_()
    attention(qk, k, v, window=4).sum().backward()
    attention_reference(qr, k.double(), v.double(), window=4).sum().backward()
    assert_rel_close(qk.grad, qr.grad, torch.float32, "dq")


def test_attention_output_is_laid_out_as_bthd_and_not_a_view():
    q, k, v, _ = _inputs((2, 3, 9, 16), torch.float32, seed=7)
    out = attention(q, k, v)
    assert out.shape == q.shape
    assert out.transpose(1, 2).is_contiguous()  # heads merge back into (B, T, C) without a copy
    assert out._base is None  # a view of an internal buffer would forbid in-place ops on the output


def test_new_buffer_is_poisoned_in_tests():
    buf = new_buffer((3, 4), torch.float32, torch.device(DEVICE))
    assert torch.isnan(buf).all()
