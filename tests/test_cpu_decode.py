"""minigpt.cpu_decode, the C matrix-vector product decoding uses on a CPU, against float64.

float32 tolerance: the sum of `in` products of unit normals, each rounded once, in another
order than the reference: rtol 1e-5 and atol 1e-5 * sqrt(in).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minigpt import GPT, GPTConfig, cpu_decode, ops

needs_kernel = pytest.mark.skipif(not cpu_decode.available(), reason="no AVX-512 CPU or no C compiler here")


def _reference(x, weight, bias):
    out = x.double() @ weight.double().T
    return out + bias.double() if bias is not None else out


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(out_features=st.integers(1, 70), in_features=st.integers(1, 100), with_bias=st.booleans(),
       flat=st.booleans(), seed=st.integers(0, 2**16))
def test_gemv_matches_float64(out_features, in_features, with_bias, flat, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(in_features if flat else (1, in_features), generator=g)
    bias = torch.randn(out_features, generator=g) if with_bias else None
    y = cpu_decode.gemv(x, weight, bias)
    assert y.shape == (*x.shape[:-1], out_features) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _reference(x, weight, bias), rtol=1e-5, atol=1e-5 * in_features**0.5)


@needs_kernel
def test_gemv_same_bits_at_any_thread_count():
    # Each row's sum is one thread's work in a fixed order, so threads change nothing.
    g = torch.Generator().manual_seed(0)
    weight, x, bias = torch.randn(3072, 768, generator=g), torch.randn(1, 768, generator=g), torch.randn(3072, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(cpu_decode.gemv(x, weight, bias))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


@needs_kernel
def test_gemv_refuses_a_wrong_length():
    with pytest.raises(ValueError, match=r"one row of 4 values and a bias of 3; got x \(5,\), bias None"):
        cpu_decode.gemv(torch.randn(5), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"got x \(4,\), bias \(1,\)"):
        cpu_decode.gemv(torch.randn(4), torch.randn(3, 4), torch.randn(1))


@needs_kernel
def test_linear_sends_only_one_row_without_gradient_to_the_kernel(monkeypatch):
    calls = []
    real = cpu_decode.gemv
    monkeypatch.setattr(cpu_decode, "gemv", lambda *a: calls.append(a[0].shape) or real(*a))
    weight = torch.randn(2048, 256)  # large enough that oneDNN, not MKL, would take it
    bias = torch.randn(2048)
    with torch.no_grad():
        one = ops.linear(torch.randn(1, 1, 256), weight, bias)
        ops.linear(torch.randn(2, 256), weight, bias)  # two rows: oneDNN
    assert calls == [(1, 1, 256)] and one.shape == (1, 1, 2048)
    ops.linear(torch.randn(1, 256, requires_grad=True), weight, bias)  # a gradient is wanted: oneDNN
    assert len(calls) == 1
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        torch.testing.assert_close(ops.linear(x, weight, bias).double(), _reference(x, weight, bias),
                                   rtol=1e-5, atol=1e-5 * 16)


def test_off_without_a_compiler_or_when_asked(tmp_path):
    # A fresh interpreter: available() is decided once per process.
    code = ("from minigpt import cpu_decode, ops; import torch; print(cpu_decode.available()); "
            "w = torch.randn(2048, 256); x = torch.randn(1, 256);"
            "print(torch.allclose(ops.linear(x, w), x @ w.T, rtol=1e-5, atol=1e-4))")
    for env in ({"CC": str(tmp_path / "no-such-cc")}, {"MINIGPT_CPU_DECODE": "0"}):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **env})
        assert done.stdout.split() == ["False", "True"], done.stderr


@needs_kernel
def test_greedy_decoding_tokens_unchanged(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=4096, block_size=64, n_layer=2, n_head=4, n_embd=256)).eval()
    prompts = [[1, 2, 3, 4, 5], [40, 41]]
    calls = []
    real = cpu_decode.gemv
    monkeypatch.setattr(cpu_decode, "gemv", lambda *a: calls.append(1) or real(*a))
    with_kernel = [model.generate([p], 24, temperature=0)[0] for p in prompts]
    assert calls  # the head and the MLP's products went through it
    monkeypatch.setattr(cpu_decode, "available", lambda: False)
    without = [model.generate([p], 24, temperature=0)[0] for p in prompts]
    assert with_kernel == without


@needs_kernel
def test_linear_keeps_the_kernel_out_of_what_it_cannot_serve(monkeypatch):
    calls = []
    real = cpu_decode.gemv
    monkeypatch.setattr(cpu_decode, "gemv", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    weight, x = torch.randn(2048, 256, generator=g), torch.randn(1, 256, generator=g)
    with torch.no_grad():
        # A bias that broadcasts (F.linear takes it) would be read past its end.
        short = torch.randn(1, generator=g)
        torch.testing.assert_close(ops.linear(x, weight, short).double(), _reference(x, weight, short),
                                   rtol=1e-5, atol=1e-5 * 16)
    assert calls == []
    with torch.no_grad():
        # The tracer records torch's ops, never a write through ctypes (its check then runs
        # the function eagerly, through the kernel).
        traced = torch.jit.trace(lambda t: ops.linear(t, weight), (x,))
        other = torch.randn(1, 256, generator=g)
        torch.testing.assert_close(traced(other).double(), _reference(other, weight, None), rtol=1e-5, atol=1e-5 * 16)
    assert "aten::linear" in str(traced.graph)
    calls.clear()
    # Under another default device the output still lands on the CPU, where the kernel writes.
    with torch.no_grad(), torch.device("meta"):
        out = ops.linear(x, weight)
    assert out.device.type == "cpu" and calls == [1]
    torch.testing.assert_close(out.double(), _reference(x, weight, None), rtol=1e-5, atol=1e-5 * 16)


def test_linear_keeps_forward_mode_tangents():
    import torch.autograd.forward_ad as forward_ad

    g = torch.Generator().manual_seed(4)
    weight, x, tangent = torch.randn(2048, 256, generator=g), torch.randn(1, 256, generator=g), torch.randn(1, 256, generator=g)
    with torch.no_grad(), forward_ad.dual_level():
        out = forward_ad.unpack_dual(ops.linear(forward_ad.make_dual(x, tangent), weight))
    torch.testing.assert_close(out.tangent.double(), _reference(tangent, weight, None), rtol=1e-5, atol=1e-5 * 16)
