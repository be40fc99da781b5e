"""minigpt.cpu_decode, decoding's C kernels on a CPU, against float64.

`gemv`, the matrix-vector product: float32 tolerance for the sum of `in` products of unit
normals, each rounded once, in another order than the reference: rtol 1e-5 and atol
1e-5 * sqrt(in).

`BlockPlan.step`, a whole block for one token, as `Block` takes it while decoding: its
reference is the same model in float64 on torch's path (float64 never takes the kernel). The
kernel's exp and GELU are within a few float32 ulps, and every sum runs in float32: logits of
about unit size agree within 1e-4 (observed: under 4e-6).
"""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minigpt import GPT, GPTConfig, cpu_decode, ops
from minigpt import model as model_module

needs_kernel = pytest.mark.skipif(not cpu_decode.available(), reason="no AVX-512 or AVX2 CPU, or no C compiler here")


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
@settings(max_examples=40, deadline=None)
@given(out_features=st.integers(1, 70), in_features=st.one_of(st.integers(1, 100), st.sampled_from([1031, 1543])),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_gemv_of_a_bfloat16_weight_sums_in_float32_and_rounds_once(out_features, in_features, with_bias, seed):
    # The weight and bias are read as the bfloat16 values they are; x is taken in float32; the
    # result is float32 sums rounded to bfloat16 once: within half a bfloat16 step of float64's
    # product of the same values, plus float32 rounding.
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g).to(torch.bfloat16)
    x = torch.randn(1, in_features, generator=g)
    bias = torch.randn(out_features, generator=g).to(torch.bfloat16) if with_bias else None
    y = cpu_decode.gemv(x, weight, bias)
    assert y.shape == (1, out_features) and y.dtype == torch.bfloat16
    expected = _reference(x, weight, bias)
    torch.testing.assert_close(y.double(), expected, rtol=2**-8, atol=1e-5 * in_features**0.5)


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
    with pytest.raises(ValueError, match=r"one row of 4 values, a float32 or bfloat16 weight and a bias of 3 in the "
                                         r"weight's dtype; got x \(5,\), weight torch.float32, bias None"):
        cpu_decode.gemv(torch.randn(5), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"got x \(4,\), weight torch.float32, bias \(\(1,\), torch.float32\)"):
        cpu_decode.gemv(torch.randn(4), torch.randn(3, 4), torch.randn(1))
    with pytest.raises(ValueError, match=r"weight torch.float64, bias None"):
        cpu_decode.gemv(torch.randn(4), torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weight torch.bfloat16, bias \(\(3,\), torch.float32\)"):
        cpu_decode.gemv(torch.randn(4), torch.randn(3, 4).bfloat16(), torch.randn(3))
    with pytest.raises(ValueError, match=r"got x \(2, 2\)"):  # four values, but two rows
        cpu_decode.gemv(torch.randn(2, 2), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"plain contiguous CPU tensors; got weight strides \(1, 3\)"):
        cpu_decode.gemv(torch.randn(4), torch.randn(4, 3).t())
    with pytest.raises(ValueError, match=r"got weight strides \(0, 1\)"):  # an expanded row: one row's storage
        cpu_decode.gemv(torch.randn(4), torch.randn(1, 4).expand(3, 4))


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
    ops.linear(torch.randn(1, 256, requires_grad=True), weight, bias)  # a gradient is wanted: oneDNN, or MKL on AVX2
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
    for env in ({"CC": str(tmp_path / "no-such-cc")}, {"MINIGPT_CPU_DECODE": "0"}, {"MINIGPT_CPU_GEMV": "0"}):
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


# ---- a whole block for one token -------------------------------------------------------------

def _random_model(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than GPT-2's init, so every part moves the logits
            p.normal_(0.0, 0.3)
    return model


@contextmanager
def counting_block_steps():
    """Counts the tokens' blocks that the kernel computes inside the `with`."""
    calls = []
    real = cpu_decode.BlockPlan.step
    with mock.patch.object(cpu_decode.BlockPlan, "step", lambda *a: calls.append(1) or real(*a)):
        yield calls


@pytest.fixture
def block_steps():
    with counting_block_steps() as calls:
        yield calls


def _decode_logits(model: GPT, ids: torch.Tensor, prompt: int) -> list[torch.Tensor]:
    """Logits of each token after a prompt of `prompt` tokens, fed one at a time through the cache."""
    with torch.no_grad():
        cache = model.new_cache(1)
        model(ids[:, :prompt], cache=cache)
        return [model(ids[:, t:t + 1], cache=cache).logits[0, -1] for t in range(prompt, ids.shape[1])]


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(n_head=st.integers(1, 4), head_dim=st.sampled_from([4, 16, 24, 33]), n_inner=st.integers(1, 90),
       bias=st.booleans(), qkv_bias=st.booleans(), activation=st.sampled_from(["gelu_tanh", "gelu"]),
       neo_scale=st.booleans(), banded=st.booleans(), window=st.integers(1, 6), prompt=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_block_step_matches_float64(n_head, head_dim, n_inner, bias, qkv_bias, activation, neo_scale,
                                    banded, window, prompt, seed):
    config = GPTConfig(vocab_size=97, block_size=24, n_layer=2, n_head=n_head, n_embd=n_head * head_dim,
                       n_inner=n_inner, bias=bias, qkv_bias=qkv_bias, activation=activation,
                       attention_scale=1.0 if neo_scale else None,
                       attention_pattern=("dense", "banded") if banded else ("dense",), attention_window=window)
    model = _random_model(config, seed)
    reference = GPT(config).double().eval()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(seed))
    with counting_block_steps() as block_steps:
        got = _decode_logits(model, ids, prompt)
    # Every block of every decoded token (a banded ring past its window too), and of a one-token prompt.
    assert len(block_steps) == 2 * (16 - prompt + (prompt == 1))
    for ours, theirs in zip(got, _decode_logits(reference, ids, prompt)):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_block_step_same_bits_at_any_thread_count():
    model = _random_model(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=3, n_embd=96))
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        results = []
        with counting_block_steps() as block_steps:
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                results.append(torch.stack(_decode_logits(model, ids, 4)))
    finally:
        torch.set_num_threads(threads)
    assert len(block_steps) == 3 * 2 * 8
    assert all(torch.equal(results[0], r) for r in results[1:])


def _small_model() -> GPT:
    return _random_model(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1))


@needs_kernel
def test_a_hooked_block_takes_torchs_path_and_its_hook_fires(block_steps):
    model = _small_model()
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(2))
    plain = _decode_logits(model, ids, 4)
    assert len(block_steps) == 12
    seen = []

    def ablate(activation, hook):
        seen.append(hook.name)
        return torch.zeros_like(activation)

    block_steps.clear()
    with model.hooks(fwd_hooks=[("blocks.0.mlp.hook_post", ablate)]):
        hooked = _decode_logits(model, ids, 4)
    assert len(block_steps) == 6 and len(seen) == 7  # block 1 still in C; block 0's hook ran for the prompt and each token
    with torch.no_grad():
        model.blocks[0].mlp.proj.weight.zero_()  # the ablation written into the weights: the MLP gives its bias
    block_steps.clear()
    for a, b in zip(hooked, _decode_logits(model, ids, 4)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(block_steps) == 12
    assert not all(torch.allclose(a, b) for a, b in zip(plain, hooked))


@needs_kernel
def test_the_kernel_stays_out_of_what_could_tell(block_steps):
    model = _small_model()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(3))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: None)
    try:
        _decode_logits(model, ids, 4)  # a hook for every module: each must run
    finally:
        handle.remove()
    assert block_steps == []
    pre = model.blocks[1].attn.register_forward_pre_hook(lambda module, inputs: None)
    _decode_logits(model, ids, 4)
    pre.remove()
    assert len(block_steps) == 4  # block 0 only
    block_steps.clear()
    model.train()  # dropout on
    _decode_logits(model, ids, 4)
    model.eval()
    with torch.enable_grad():  # a gradient wanted
        cache = model.new_cache(1)
        model(ids[:, :4], cache=cache)
        assert model(ids[:, 4:5], cache=cache).logits.requires_grad
    assert block_steps == []
    model.set_use_attn_result(True)  # an optional hook point switched on
    _decode_logits(model, ids, 4)
    model.set_use_attn_result(False)
    assert block_steps == []

    class Wrapped(model_module.Linear):  # LoRA or another wrapper of a product
        pass

    fc = model.blocks[0].mlp.fc
    model.blocks[0].mlp.fc = Wrapped(fc.in_features, fc.out_features)
    _decode_logits(model, ids, 4)
    assert len(block_steps) == 4  # block 1 only


@needs_kernel
def test_a_module_swapped_in_with_its_hook_keeps_it(block_steps):
    # The walk for hooks is skipped while torch's hook counter has not moved; a product swapped
    # in with a hook registered before that walk is caught when its new weight rebuilds the plan.
    model = _small_model()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(6))
    fc = model.blocks[0].mlp.fc
    replacement = model_module.Linear(fc.in_features, fc.out_features)
    seen = []
    replacement.register_forward_hook(lambda module, inputs, output: seen.append(1))
    _decode_logits(model, ids, 4)
    assert len(block_steps) == 8
    model.blocks[0].mlp.fc = replacement
    block_steps.clear()
    _decode_logits(model, ids, 4)
    assert len(seen) == 5 and len(block_steps) == 4  # the prompt and four tokens through the hook; block 1 in C


@needs_kernel
def test_new_weights_are_read_where_they_are(block_steps):
    model = _small_model()
    reference = _small_model().double()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(4))
    _decode_logits(model, ids, 4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.data = torch.randn(96, 32, generator=g)  # moved: the plan is rebuilt
        model.blocks[1].mlp.fc.weight.mul_(-2.0)  # in place: read where it is
        model.blocks[1].ln_2.bias = torch.nn.Parameter(torch.randn(32, generator=g))  # a new Parameter
    reference.load_state_dict(model.state_dict())
    block_steps.clear()
    for ours, theirs in zip(_decode_logits(model, ids, 4), _decode_logits(reference, ids, 4)):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-4)
    assert len(block_steps) == 8


@needs_kernel
def test_block_plan_refuses_shapes_that_do_not_fit():
    model = _small_model()
    block = model.blocks[0]
    weights = [block.ln_1.weight, block.ln_1.bias, block.attn.qkv.weight, block.attn.qkv.bias, block.attn.proj.weight,
               block.attn.proj.bias, block.ln_2.weight, block.ln_2.bias, block.mlp.fc.weight, block.mlp.fc.bias,
               block.mlp.proj.weight, block.mlp.proj.bias]
    plan = cpu_decode.BlockPlan(tuple(weights), n_head=2, eps=1e-5, scale=0.25, activation="gelu_tanh")
    cache = model.new_cache(1).layers[0]
    with pytest.raises(ValueError, match=r"slot 32 and count 1 do not fit a block of n_embd 32 with 2 heads"):
        plan.step(torch.randn(1, 1, 32), cache.k, cache.v, 32, 1)
    weights[5] = torch.randn(31)
    with pytest.raises(ValueError, match=r"attn_proj_b \(31,\) \(expected \(32,\)\)"):
        cpu_decode.BlockPlan(tuple(weights), n_head=2, eps=1e-5, scale=0.25, activation="gelu_tanh")
    with pytest.raises(ValueError, match=r"activation 'relu' \(one of \['gelu', 'gelu_tanh'\]\)"):
        cpu_decode.BlockPlan(tuple(weights[:5] + [None] + weights[6:]), n_head=2, eps=1e-5, scale=0.25,
                             activation="relu")


def _block_reference(weights, x, k, v, slot, count, *, n_head, eps, scale, activation, cache_dtype):
    """A block for one token in float64, written out here (independent of minigpt.model): the
    kernel's own rounding points replayed, the new key and value rounded to the cache's dtype."""
    ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, mproj_w, mproj_b = (
        None if w is None else w.double() for w in weights)
    C = x.numel()
    D = C // n_head

    def norm(t, g, b):
        t = (t - t.mean()) / torch.sqrt(t.var(unbiased=False) + eps) * g
        return t + b if b is not None else t

    def product(t, w, b):
        return t @ w.T + b if b is not None else t @ w.T

    x = x.double().reshape(C)
    q, k_new, v_new = product(norm(x, ln1_w, ln1_b), qkv_w, qkv_b).split(C)
    keys, values = k.double().reshape(n_head, -1, D).clone(), v.double().reshape(n_head, -1, D).clone()
    keys[:, slot] = k_new.view(n_head, D).to(cache_dtype).double()
    values[:, slot] = v_new.view(n_head, D).to(cache_dtype).double()
    scores = torch.einsum("hd,hsd->hs", q.view(n_head, D), keys[:, :count]) * scale
    z = torch.einsum("hs,hsd->hd", torch.softmax(scores, dim=-1), values[:, :count]).reshape(C)
    x = x + product(z, proj_w, proj_b)
    hidden = torch.nn.functional.gelu(product(norm(x, ln2_w, ln2_b), fc_w, fc_b),
                                      approximate="tanh" if activation == "gelu_tanh" else "none")
    return x + product(hidden, mproj_w, mproj_b), keys[:, slot], values[:, slot]


@needs_kernel
@settings(max_examples=20, deadline=None)
@given(n_head=st.integers(1, 3), head_dim=st.sampled_from([8, 16, 20]), n_inner=st.integers(1, 70),
       biases=st.booleans(), activation=st.sampled_from(["gelu_tanh", "gelu"]), bfloat16=st.booleans(),
       capacity=st.integers(1, 20), data=st.data())
def test_block_plan_step_matches_a_float64_block(n_head, head_dim, n_inner, biases, activation, bfloat16, capacity,
                                                 data):
    dtype = torch.bfloat16 if bfloat16 else torch.float32
    C = n_head * head_dim
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    shapes = [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (n_inner, C), (n_inner,), (C, n_inner), (C,)]
    weights = tuple(None if (i % 2 and len(shape) == 1 and not biases and i != 1)
                    else (torch.randn(shape, generator=g) * (1.0 if i in (0, 6) else 0.3)).to(dtype)
                    for i, shape in enumerate(shapes))
    slot = data.draw(st.integers(0, capacity - 1))
    count = data.draw(st.integers(slot + 1, capacity))
    x = torch.randn(1, 1, C, generator=g).to(dtype)
    k, v = (torch.randn(1, n_head, capacity, head_dim, generator=g).to(dtype) for _ in range(2))
    k_before, v_before = k.clone(), v.clone()
    settings_ = dict(n_head=n_head, eps=1e-5, scale=head_dim ** -0.5, activation=activation)
    out = cpu_decode.BlockPlan(weights, **settings_).step(x, k, v, slot, count)
    expected, k_new, v_new = _block_reference(weights, x, k_before, v_before, slot, count, cache_dtype=dtype,
                                              **settings_)
    assert out.dtype == dtype and out.shape == x.shape
    # bfloat16: float32 inside, one rounding where stored, so within one bfloat16 step of float64's.
    tolerance = dict(rtol=2**-8, atol=1e-5) if bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double().reshape(C), expected, **tolerance)
    torch.testing.assert_close(k[0, :, slot].double(), k_new, **tolerance)  # each head's key in its row
    torch.testing.assert_close(v[0, :, slot].double(), v_new, **tolerance)
    others = [s for s in range(capacity) if s != slot]
    assert torch.equal(k[:, :, others], k_before[:, :, others]) and torch.equal(v[:, :, others], v_before[:, :, others])


@needs_kernel
def test_a_bfloat16_model_decodes_closer_to_float64_than_torchs_bfloat16_path(monkeypatch):
    # The same bfloat16 weights three ways: C (float32 between reads and stores), torch's
    # bfloat16 operators (every intermediate rounded), and float64. The first token has no
    # prompt, so the cache holds only what each path wrote.
    model = _random_model(GPTConfig(vocab_size=200, block_size=40, n_layer=3, n_head=4, n_embd=128), seed=7)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 / 3)
    model = model.to(torch.bfloat16)
    reference = GPT(model.config).double().eval()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 200, (1, 30), generator=torch.Generator().manual_seed(8))
    expected = torch.stack(_decode_logits(reference, ids, 1))
    with counting_block_steps() as block_steps:
        ours = torch.stack(_decode_logits(model, ids, 1)).double()
    assert len(block_steps) == 3 * 30
    monkeypatch.setattr(model_module.Block, "_c_may_decode", lambda *args: False)
    torchs = torch.stack(_decode_logits(model, ids, 1)).double()
    scale = expected.abs().mean()
    assert (ours - expected).abs().mean() < 0.9 * (torchs - expected).abs().mean()
    torch.testing.assert_close(ours, expected, rtol=0.0, atol=0.05 * scale)


@needs_kernel
def test_two_threads_share_a_gpt2_sized_block(block_steps):
    # GPT-2's width: the rows of each product and the heads split over two threads, in float32
    # against float64.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = _random_model(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=12, n_embd=768), seed=9)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.1)
        reference = GPT(model.config).double().eval()
        reference.load_state_dict(model.state_dict())
        ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(10))
        for ours, theirs in zip(_decode_logits(model, ids, 2), _decode_logits(reference, ids, 2)):
            torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)
    assert len(block_steps) == 4


@needs_kernel
def test_what_the_kernel_does_not_take_goes_to_torch(block_steps, monkeypatch):
    model = _small_model()
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        model.blocks[0].mlp.fc.bias = torch.nn.Parameter(torch.randn(1))  # a bias that broadcasts
        model.blocks[1].mlp.approximate = "none"  # the GELU changed after the plan was made: seen
        model.blocks[1].attn.forward = model.blocks[1].attn.forward  # an instance's own forward
    ours = _decode_logits(model, ids, 4)
    assert block_steps == []
    with monkeypatch.context() as torch_only:
        torch_only.setattr(model_module.Block, "_c_may_decode", lambda *args: False)
        for a, b in zip(ours, _decode_logits(model, ids, 4)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # A cache shorter than the sequence: torch's path says so, as it would without the kernel.
    short = _small_model()
    with torch.no_grad():
        cache = short.new_cache(1, max_length=3)
        for t in range(3):
            short(ids[:, t:t + 1], cache=cache)
        with pytest.raises(ValueError, match=r"holds 3 tokens \(max_length\) and token 3 does not fit"):
            short(ids[:, 3:4], cache=cache)


@needs_kernel
def test_settings_changed_after_the_first_token_are_read(block_steps):
    model = _small_model()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(12))
    _decode_logits(model, ids, 4)
    for block in model.blocks:
        block.mlp.approximate = "none"
        block.ln_1.eps = block.ln_2.eps = 0.5
        block.attn.scale = 1.0
    reference = _small_model().double()
    reference.load_state_dict(model.state_dict())
    for block in reference.blocks:
        block.mlp.approximate = "none"
        block.ln_1.eps = block.ln_2.eps = 0.5
        block.attn.scale = 1.0
    block_steps.clear()
    for ours, theirs in zip(_decode_logits(model, ids, 4), _decode_logits(reference, ids, 4)):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-4)
    assert len(block_steps) == 8


@needs_kernel
def test_a_weight_that_is_not_a_parameter_or_a_patched_forward_keeps_torchs_path(block_steps, monkeypatch):
    model = _small_model()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(13))
    proj = model.blocks[0].attn.proj
    weight = proj.weight.detach().clone()
    del proj.weight
    proj.register_buffer("weight", weight)  # F.linear reads it; the kernel's plan finds no parameter
    ours = _decode_logits(model, ids, 4)
    assert len(block_steps) == 4  # block 1 only
    block_steps.clear()
    original = model_module.MLP.forward
    monkeypatch.setattr(model_module.MLP, "forward", lambda self, x: original(self, x))  # a patched class
    patched = _decode_logits(model, ids, 4)
    assert block_steps == []
    for a, b in zip(ours, patched):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_block_plan_step_at_the_ends_of_exps_range(activation):
    # GELU's inputs of several hundred either way and attention scores hundreds apart take the
    # kernel's exp to its clamps at -88 and 88.7 (2^-127 and 2^128 before the polynomial's
    # factor): the block must stay finite and match float64 there too.
    C, n_head, n_inner, capacity = 32, 2, 48, 12
    g = torch.Generator().manual_seed(3)
    shapes = [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (n_inner, C), (n_inner,), (C, n_inner), (C,)]
    scales = {2: 8.0, 8: 120.0}  # wide queries and keys; very wide MLP inputs
    weights = tuple(torch.randn(shape, generator=g) * scales.get(i, 1.0) for i, shape in enumerate(shapes))
    x = torch.randn(1, 1, C, generator=g)
    k, v = (torch.randn(1, n_head, capacity, C // n_head, generator=g) * 20 for _ in range(2))
    k_before, v_before = k.clone(), v.clone()
    settings_ = dict(n_head=n_head, eps=1e-5, scale=(C // n_head) ** -0.5, activation=activation)
    out = cpu_decode.BlockPlan(weights, **settings_).step(x, k, v, 5, capacity)
    expected, _, _ = _block_reference(weights, x, k_before, v_before, 5, capacity, cache_dtype=torch.float32,
                                      **settings_)
    hidden = torch.nn.functional.linear(torch.nn.functional.layer_norm(x.reshape(C), (C,)), weights[8], weights[9])
    assert hidden.min() < -300 and hidden.max() > 300  # the MLP's inputs reach both ends
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double().reshape(C), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
