"""minigpt.ops's attention paths, minigpt.banded (the O(T * w) band of the sdpa and math backends)
and minigpt.masks (the one mask rule), against the reference.

Window semantics: query i sees key j iff i - w < j <= i.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_rel_close

from minigpt_kernels import attention_reference
from minigpt import banded, masks, ops
from minigpt.config import GPTConfig


def _qkv(B, H, T, D, seed, S=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, H, S or T, D, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


@given(
    T=st.integers(1, 70),
    w=st.integers(1, 80),
    D=st.sampled_from([1, 8, 24]),
    backend=st.sampled_from(["math", "sdpa"]),
    seed=st.integers(0, 2**16),
)
def test_banded_attention_matches_reference(T, w, D, backend, seed):
    q, k, v = _qkv(2, 2, T, D, seed)
    out = ops.banded_attention(q, k, v, window=w, scale=D**-0.5, backend=backend)
    ref = attention_reference(q.double(), k.double(), v.double(), window=w)
    assert_rel_close(out, ref, torch.float32, "out")


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("T, w", [(1, 1), (9, 1), (64, 16), (67, 16), (20, 20), (5, 64)])
def test_banded_attention_bwd_matches_reference(backend, T, w):
    q, k, v = _qkv(1, 2, T, 8, seed=T + w)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    refs = [t.double().requires_grad_() for t in (q, k, v)]
    do = torch.randn(1, 2, T, 8)
    ops.banded_attention(*leaves, window=w, scale=0.3, backend=backend).backward(do)
    attention_reference(*refs, window=w, scale=0.3).backward(do.double())
    for name, got, want in zip(("dq", "dk", "dv"), leaves, refs):
        assert_rel_close(got.grad, want.grad, torch.float32, name)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("T, S, w", [(7, 7, 3), (5, 9, 4), (6, 30, 4), (1, 4, 4), (12, 15, 5)])
def test_indexed_attention_banded_matches_mask(backend, T, S, w):
    # Queries at positions start .. start+T-1 against S keys ending at the last query, given
    # in ring order (as a banded layer's cache holds them), with and without left padding.
    start = S - T + 2
    q, k, v = _qkv(2, 2, T, 8, seed=S, S=S)
    k_index = torch.arange(start + T - S, start + T)
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(w))
    for left_pad in (None, torch.tensor([0, 3])):
        got, _ = ops.indexed_attention(q, k[:, :, perm], v[:, :, perm], start=start, k_index=k_index[perm],
                                       window=w, left_pad=left_pad, scale=0.5, backend=backend)
        mask = ops.band_mask(torch.arange(start, start + T), k_index, w, left_pad)
        want, _ = ops.masked_attention(q.double(), k.double(), v.double(), mask, scale=0.5, backend="math")
        assert_rel_close(got, want, torch.float32, f"left_pad={left_pad}")


def test_causal_attention_banded_builds_no_t_by_t_tensor(monkeypatch):
    # The sdpa and math paths never hand a (T, T) mask or score matrix to PyTorch.
    T, w = 96, 8
    q, k, v = _qkv(1, 1, T, 4, seed=0)
    seen = []
    real_sdpa, real_math = ops.F.scaled_dot_product_attention, ops._math_attention
    monkeypatch.setattr(ops.F, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(tuple(a[1].shape)) or real_sdpa(*a, **kw))
    monkeypatch.setattr(ops, "_math_attention", lambda q_, k_, *a: seen.append(tuple(k_.shape)) or real_math(q_, k_, *a))
    for backend in ("sdpa", "math"):
        ops.causal_attention(q, k, v, window=w, scale=0.5, backend=backend)
    # Query blocks of b = w/2 see the w + b keys they can reach: 1.5w per query, not 2w.
    assert seen and all(shape[-2] == w + w // 2 for shape in seen), seen


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("T, w, block", [(67, 16, 16), (67, 16, 8), (67, 16, 4), (5, 12, 3), (40, 9, 9), (33, 8, 1)])
def test_banded_attention_any_block_size(backend, T, w, block):
    # Every query block size b dividing w gives the same outputs and gradients.
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, T, 8, seed=1))
    out = ops.banded_attention(q, k, v, window=w, scale=8**-0.5, backend=backend, block=block)
    ref = attention_reference(q.double(), k.double(), v.double(), window=w)
    assert_rel_close(out, ref, torch.float32, "out")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_rel_close(g, r, torch.float32, f"d{name}")


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("T, w", [(64, 32), (9, 5), (8, 4), (2, 1)])
def test_causal_attention_short_banded_sequence_scores_the_whole_band(backend, T, w):
    # For w < T <= 2w the whole (T, T) band is O(T*w) and scored in one call; same outputs and
    # gradients as the reference, and inspect counts T keys per query for it.
    from minigpt.counts import computed_attention_context

    assert ops.scores_whole_band(T, w)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, T, 8, seed=T))
    out, _ = ops.causal_attention(q, k, v, window=w, scale=8**-0.5, backend=backend)
    ref = attention_reference(q.double(), k.double(), v.double(), window=w)
    assert_rel_close(out, ref, torch.float32, "out")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for name, g, r in zip("qkv", grads, torch.autograd.grad(ref.sum(), (q, k, v))):
        assert_rel_close(g, r, torch.float32, f"d{name}")
    config = GPTConfig(vocab_size=8, block_size=T, n_layer=1, n_head=1, n_embd=8,
                       attention_pattern=("banded",), attention_window=w)
    assert computed_attention_context(config, T, 0, backend) == float(T)


@pytest.mark.parametrize("T", [1, 2, 7, 16])
@pytest.mark.parametrize("w", [None, 1, 3, 7, 20])
def test_one_mask_rule_in_the_model_the_reference_and_the_kernel(T, w):
    # minigpt.masks.visible is the rule; the reference and the kernel's inline mask spell it
    # again (kernels/ never imports minigpt), and all three give i - w < j <= i.
    from minigpt_kernels.attention import _attention_mask
    from minigpt_kernels.reference import attention_mask

    want = torch.tensor([[j <= i and (w is None or i - w < j) for j in range(T)] for i in range(T)])
    i = torch.arange(T)
    assert torch.equal(masks.visible(i[:, None], i[None, :], w), want)
    assert torch.equal(masks.band_mask(i, i, w), want)
    assert torch.equal(attention_mask(T, True, w), want)
    assert torch.equal(_attention_mask.fn(i[:, None], i[None, :], T, True, w or 0), want)


@pytest.mark.parametrize("n, b, w, first_key, start", [(3, 2, 4, -4, 0), (4, 3, 3, -2, 5), (2, 1, 1, 0, 2)])
def test_band_block_mask_is_the_rule_in_query_coordinates(n, b, w, first_key, start):
    # Row r of block m is query m*b + r, column c is key m*b - w + c; keys before first_key
    # do not exist; with left padding a padding query sees itself only.
    left_pad = torch.tensor([0, start + 2])
    for pad in (None, left_pad):
        got = banded.band_block_mask(n, b, w, first_key, start, pad, 1, "cpu")  # (n, 1 or B, b, w+b)
        for m in range(n):
            i = start + m * b + torch.arange(b)
            j = start + m * b - w + torch.arange(w + b)
            want = masks.band_mask(i, j, w, pad)[:, 0] if pad is not None else masks.band_mask(i, j, w)[None]
            want = want & (j >= start + first_key)
            assert torch.equal(got[m], want), (m, pad)
