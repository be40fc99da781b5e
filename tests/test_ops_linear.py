"""`ops.linear`, the model's matrix products: oneDNN on a CPU in float32 (forward and the
backward pass's two products; on an x86 CPU with AVX2 alone, only products that want no
gradient), `F.linear` otherwise. Both are held to a float64 reference; the path each case
takes is asserted, so a test of one path cannot pass on the other."""
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig, ops
from minigpt.generate import generate, next_token_logits
from minigpt.model import Linear
from tests.helpers import randomize_
from tests.tolerances import assert_rel_close


def reference(x, weight, bias):
    out = x.double() @ weight.double().t()
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("by_mkl", [False, True], ids=["oneDNN trains", "MKL trains, as on AVX2"])
@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 3 * ops.GEMV_MAX_ROWS),
    lead=st.sampled_from([(), (1,), (2,)]),
    in_features=st.sampled_from([384, 512, 771]),
    out_features=st.sampled_from([347, 1152, 2049]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_float32_products_take_onednn_and_match_float64(by_mkl, rows, lead, in_features, out_features, bias, seed):
    """With no gradient wanted the product is oneDNN's (or, one row, `cpu_decode.gemv`'s) on
    every CPU: F.linear is never called, wherever training products go."""
    g = torch.Generator().manual_seed(seed)
    batch = lead + (rows,)
    x = torch.randn(*batch, in_features, generator=g)
    weight = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    with torch.no_grad(), mock.patch.object(ops, "_training_products_by_mkl", lambda: by_mkl), \
            mock.patch.object(ops.F, "linear", side_effect=AssertionError("F.linear was called")):
        assert ops._one_dnn_product(x, weight, wants_grad=False)
        out = ops.linear(x, weight, b)
    assert out.dtype == torch.float32 and out.shape == (*batch, out_features)
    assert_rel_close(out, reference(x, weight, b), torch.float32, "ops.linear (oneDNN)")


def backward_nodes(out: torch.Tensor) -> set[str]:
    """The names of every node of `out`'s backward graph."""
    names, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node.name() not in names:
            names.add(node.name())
            todo.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("by_mkl", [False, True], ids=["oneDNN", "MKL as on AVX2"])
@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 70), out_features=st.sampled_from([5, 96, 384, 1001]), bias=st.booleans(),
       seed=st.integers(0, 2**16))
@example(rows=70, out_features=96, bias=True, seed=1)  # on oneDNN, input wider: dW as dy^T x
@example(rows=70, out_features=384, bias=False, seed=2)  # on oneDNN, square: dW as (x^T dy)^T
@example(rows=70, out_features=1001, bias=True, seed=3)  # on oneDNN, output wider: (x^T dy)^T
def test_gradients_match_float64(by_mkl, rows, out_features, bias, seed):
    """out_features below 384 take dW as dy^T x, the others as (x^T dy)^T, where oneDNN
    takes the product (the examples: 140 rows); where training products go to MKL (an x86
    CPU with AVX2 alone, `_training_products_by_mkl`), the product is F.linear's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, 384, generator=g, requires_grad=True)
    weight = torch.randn(out_features, 384, generator=g, requires_grad=True)
    b = torch.randn(out_features, generator=g, requires_grad=True) if bias else None
    up = torch.randn(2, rows, out_features, generator=g)  # the gradient arriving from above
    with mock.patch.object(ops, "_training_products_by_mkl", lambda: by_mkl):
        out = ops.linear(x, weight, b)
        large = rows * 2 > ops.GEMV_MAX_ROWS or weight.numel() >= ops.GEMV_MIN_WEIGHTS  # else F.linear anyway
        assert ("_OneDnnLinearBackward" in backward_nodes(out)) == (large and not by_mkl)
        (out * up).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    (F.linear(x64, w64, b64) * up.double()).sum().backward()
    assert_rel_close(x.grad, x64.grad, torch.float32, "dx")
    assert_rel_close(weight.grad, w64.grad, torch.float32, "dW")
    if bias:
        assert_rel_close(b.grad, b64.grad, torch.float32, "db")


@pytest.mark.parametrize("capability, by_mkl", [("AVX2", True), ("AVX512", False), ("DEFAULT", False),
                                                ("SVE256", False)])
def test_training_products_go_to_mkl_on_avx2_alone(capability, by_mkl):
    """The capability torch reports decides, once per process (the cache is bypassed here)."""
    with mock.patch.object(torch.backends.cpu, "get_cpu_capability", lambda: capability):
        assert ops._training_products_by_mkl.__wrapped__() is by_mkl


def test_a_gradient_of_the_onednn_gradient_is_refused_and_torch_func_takes_f_linear():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 384, generator=g, requires_grad=True)
    weight = torch.randn(400, 384, generator=g, requires_grad=True)
    with mock.patch.object(ops, "_training_products_by_mkl", lambda: False):
        assert ops._one_dnn_product(x, weight, wants_grad=True)
        (dx,) = torch.autograd.grad(ops.linear(x, weight).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        dx.sum().backward()
    # torch.func: the transform sees F.linear, so second derivatives are exact (float64 reference).
    hess_diag = torch.func.grad(lambda v: torch.func.grad(lambda u: ops.linear(u, weight.detach()).square().sum())(v)
                                .sum())(x.detach())
    w64 = weight.detach().double()
    expected = (2 * w64.t() @ w64).sum(0).expand(20, -1)  # d/dx sum(d/dx |W x|^2) = 1^T 2 W^T W
    assert_rel_close(hess_diag, expected, torch.float32, "second derivative by torch.func")


@pytest.mark.parametrize("case", ["few rows, small matrix", "bfloat16", "strided weight"])
def test_other_products_take_f_linear_and_match_float64(case):
    g = torch.Generator().manual_seed(0)
    width = 64 if case == "few rows, small matrix" else 512
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    x = torch.randn(3, width, generator=g).to(dtype)
    weight = torch.randn(width, 2 * width, generator=g).to(dtype)
    weight = weight[:, ::2] if case == "strided weight" else weight[:, :width].contiguous()
    bias = torch.randn(width, generator=g).to(dtype)
    assert not ops._one_dnn_product(x, weight, wants_grad=False)
    assert_rel_close(ops.linear(x, weight, bias), reference(x, weight, bias), dtype, f"ops.linear ({case})")


def test_the_model_linear_is_nn_linear_with_the_same_state():
    plain = torch.nn.Linear(384, 1152)
    ours = Linear(384, 1152)
    ours.load_state_dict(plain.state_dict())
    assert isinstance(ours, torch.nn.Linear) and list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(1, 384)
    with torch.no_grad():
        assert_rel_close(ours(x), reference(x, plain.weight, plain.bias), torch.float32, "Linear")


def wide_model():
    """Wide enough (384) that every matrix, the head included, takes the oneDNN path."""
    config = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=6, n_embd=384,
                       attention_pattern=("dense", "banded"), attention_window=8)
    return randomize_(GPT(config), seed=3, std=0.05).eval()


def test_decoding_on_the_fast_path_matches_the_float64_model():
    model = wide_model()
    with torch.no_grad():
        assert all(ops._one_dnn_product(torch.zeros(1, m.in_features), m.weight, wants_grad=False)
                   for m in model.modules() if isinstance(m, Linear))
    double = wide_model().double()
    prompt = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(4))
    tokens = generate(model, prompt, 20, temperature=0)[0]
    with torch.no_grad():
        seq = torch.cat([prompt, torch.tensor([tokens])], dim=1)
        expected = double(seq).logits[0, prompt.shape[1] - 1:-1]  # (20, V): what each step saw
        cache = model.new_cache(1)
        steps = [next_token_logits(model, prompt, cache=cache)]
        steps += [next_token_logits(model, seq[:, i:i + 1], cache=cache) for i in range(prompt.shape[1], seq.shape[1] - 1)]
    assert_rel_close(torch.cat(steps), expected, torch.float32, "decoded logits")
    assert tokens == expected.argmax(-1).tolist()


def test_bfloat16_decoding_samples_float32_logits_close_to_the_float32_model():
    model = wide_model()
    half = wide_model().to(torch.bfloat16)
    prompt = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = next_token_logits(half, prompt)
        expected = next_token_logits(model, prompt)
    assert logits.dtype == torch.float32
    assert_rel_close(logits, expected, torch.bfloat16, "bfloat16 logits")
    assert len(generate(half, prompt.tolist(), 5, temperature=0)[0]) == 5


# ---- bfloat16 weights packed for decoding (ops.pack_for_decoding) ---------------------------
needs_packing = pytest.mark.skipif(not ops._packing_usable(),
                                   reason="oneDNN has no bfloat16 on this CPU (it needs AVX-512 or AVX-NE-CONVERT)")


def bf16_linear(in_features=384, out_features=700, bias=False, seed=2):
    layer = torch.nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)))
    return layer


@needs_packing
@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 40), lead=st.sampled_from([(), (2,)]), in_features=st.sampled_from([64, 384, 771]),
       out_features=st.sampled_from([5, 347, 1152]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_packed_bfloat16_products_equal_the_plain_ones_bit_for_bit_and_match_float64(
        rows, lead, in_features, out_features, bias, seed):
    layer = bf16_linear(in_features, out_features, bias, seed)
    x = torch.randn(*lead, rows, in_features, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
    with torch.no_grad():
        plain = F.linear(x, layer.weight, layer.bias)  # torch's own bfloat16 product: the same kernel, unpacked
        assert ops.pack_for_decoding(layer) == 1
        assert ops._packed_weight(x, layer.weight, layer.bias) is not None
        packed = ops.linear(x, layer.weight, layer.bias)
    assert torch.equal(packed, plain)
    assert_rel_close(packed, reference(x, layer.weight, layer.bias), torch.bfloat16, "packed bfloat16 product")


@needs_packing
@pytest.mark.parametrize("change", ["in place", "load_state_dict", "float and back", "a new view as .data"])
def test_a_weight_changed_through_the_tensor_after_packing_is_read_plainly_and_its_copy_dropped(change):
    layer = bf16_linear()
    x = torch.randn(3, 384, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ops.pack_for_decoding(layer)
    with torch.no_grad():
        if change == "in place":
            layer.weight.mul_(-2)
        elif change == "load_state_dict":
            layer.load_state_dict(bf16_linear(seed=9).state_dict())
        elif change == "float and back":
            layer.float().to(torch.bfloat16)  # new storage under the same Parameter
        else:
            layer.weight.data = layer.weight.data[:500]  # the same storage, another view
        assert ops._packed_weight(x, layer.weight, None) is None
        assert id(layer.weight) not in ops._PACKED  # the stale copy's memory is freed
        assert torch.equal(ops.linear(x, layer.weight), F.linear(x, layer.weight))


@needs_packing
def test_writes_the_version_counter_cannot_see_are_cleared_by_unpacking():
    layer = bf16_linear()
    x = torch.randn(2, 384, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    ops.pack_for_decoding(layer)
    layer.weight.data.mul_(-2)  # .data has a version counter of its own: documented as not noticed
    assert ops.unpack_for_decoding(layer) == 1 and ops.unpack_for_decoding(layer) == 0
    with torch.no_grad():
        assert torch.equal(ops.linear(x, layer.weight), F.linear(x, layer.weight))


@needs_packing
def test_packed_weights_step_aside_while_a_gradient_is_wanted_even_for_the_bias_alone():
    layer = bf16_linear(bias=True)
    assert ops.pack_for_decoding(layer) == 1
    x = torch.randn(4, 384, dtype=torch.bfloat16, requires_grad=True)
    assert ops._packed_weight(x, layer.weight, layer.bias) is None  # grad mode on, tensors that want gradients
    ops.linear(x, layer.weight, layer.bias).float().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    layer.weight.requires_grad_(False)  # a frozen weight, a trained bias, an input that wants no gradient
    layer.bias.grad = None
    ops.linear(x.detach(), layer.weight, layer.bias).float().sum().backward()
    assert layer.bias.grad is not None
    assert ops.pack_for_decoding(torch.nn.Linear(384, 512)) == 0  # float32: oneDNN reads it in place already


@needs_packing
def test_a_packed_layer_compiles_pickles_and_deep_copies_and_inference_tensors_are_left_alone():
    import copy
    import io

    layer = bf16_linear()
    ops.pack_for_decoding(layer)
    x = torch.randn(2, 384, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    with torch.no_grad():
        expected = F.linear(x, layer.weight)
        assert torch.equal(torch.compile(lambda v: ops.linear(v, layer.weight), backend="eager")(x), expected)
        buffer = io.BytesIO()
        torch.save(layer, buffer)  # the copies live outside the Parameter
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=False)(x), expected)
        assert torch.equal(copy.deepcopy(layer)(x), expected)
    with torch.inference_mode():
        made_here = bf16_linear()
    assert ops.pack_for_decoding(made_here) == 0  # an inference tensor keeps no version counter


@needs_packing
def test_a_packed_bfloat16_model_decodes_the_same_tokens_as_the_plain_one(tmp_path, monkeypatch):
    from minigpt.model_dir import load_for_decoding

    wide_model().save_pretrained(tmp_path / "m")
    plain = load_for_decoding(tmp_path / "m", dtype="bfloat16")
    assert ops.unpack_for_decoding(plain) == 9  # 2 blocks x 4 matrices and the head: as before packing
    packed = load_for_decoding(tmp_path / "m", dtype="bfloat16")
    assert ops.pack_for_decoding(load_for_decoding(tmp_path / "m")) == 0  # float32: nothing packed
    prompts = torch.randint(0, 512, (3, 6), generator=torch.Generator().manual_seed(7)).tolist()
    expected = generate(plain, prompts, 12, temperature=0)
    used = []
    real = ops._packed_weight
    monkeypatch.setattr(ops, "_packed_weight", lambda *a: used.append(real(*a)) or used[-1])
    assert generate(packed, prompts, 12, temperature=0) == expected
    assert used and all(p is not None for p in used)  # every product of the decoding read a packed copy
    with torch.no_grad():
        assert torch.equal(packed(torch.tensor(prompts)).logits, plain(torch.tensor(prompts)).logits)


def test_bfloat16_decoding_loads_and_decodes_on_any_cpu(tmp_path):
    # Where oneDNN has no bfloat16 (a CPU with AVX2 alone), loading for decoding packs nothing
    # instead of failing in the reorder, and the products stay torch's.
    from minigpt.model_dir import load_for_decoding

    wide_model().save_pretrained(tmp_path / "m")
    model = load_for_decoding(tmp_path / "m", dtype="bfloat16")
    assert ops.unpack_for_decoding(model) == (9 if ops._packing_usable() else 0)
    assert ops.pack_for_decoding(model) == (9 if ops._packing_usable() else 0)
    prompts = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(7)).tolist()
    tokens = generate(model, prompts, 5, temperature=0)
    assert [len(row) for row in tokens] == [5, 5] and all(0 <= t < 512 for row in tokens for t in row)


# ---- bfloat16 products where oneDNN has no bfloat16 (AVX2 alone) -----------------------------
@pytest.mark.skipif(not ops._one_dnn_usable(), reason="this torch has no oneDNN")
@settings(max_examples=25, deadline=None)
@given(rows=st.sampled_from([1, 2, 7]), lead=st.sampled_from([(), (1,)]), in_features=st.sampled_from([64, 384, 771]),
       out_features=st.sampled_from([5, 347, 1152]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_bfloat16_products_without_one_dnns_bfloat16_are_summed_in_float32(rows, lead, in_features, out_features,
                                                                           bias, seed):
    # Forced here on any CPU: one row through cpu_decode.gemv (where it is built and the weight
    # is large), more rows widened to float32; both add in float32 and round once, so they
    # match float64 within bfloat16's tolerance, as torch's own bfloat16 product does.
    layer = bf16_linear(in_features, out_features, bias, seed)
    x = torch.randn(*lead, rows, in_features, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
    with mock.patch.object(ops, "_one_dnn_has_bfloat16", lambda: False), mock.patch.object(
            ops.cpu_decode, "gemv", wraps=ops.cpu_decode.gemv) as gemv, mock.patch.object(
            ops, "linear", wraps=ops.linear) as linear, torch.no_grad():
        out = ops.linear(x, layer.weight, layer.bias)
    assert out.dtype == torch.bfloat16 and out.shape == (*lead, rows, out_features)
    one_row_by_a_large_matrix = rows == 1 and layer.weight.numel() >= ops.GEMV_MIN_WEIGHTS
    assert gemv.called == (one_row_by_a_large_matrix and ops.cpu_decode.available())
    widened = [c.args for c in linear.call_args_list[1:] if c.args[0].dtype == torch.float32]  # the inner call
    assert len(widened) == (0 if gemv.called else 1)
    if widened:
        assert widened[0][1].dtype == torch.float32 and torch.equal(widened[0][1], layer.weight.float())
    assert_rel_close(out, reference(x, layer.weight, layer.bias), torch.bfloat16, "bfloat16 product summed in float32")
    torch.testing.assert_close(out.double(), F.linear(x, layer.weight, layer.bias).double(), rtol=2**-7, atol=1e-2)


def test_bfloat16_products_that_want_a_gradient_keep_torchs_operator():
    layer = bf16_linear(bias=True)
    x = torch.randn(3, 384, dtype=torch.bfloat16, requires_grad=True)
    with mock.patch.object(ops, "_one_dnn_has_bfloat16", lambda: False):
        out = ops.linear(x, layer.weight, layer.bias)
        out.float().sum().backward()
    assert torch.equal(out.detach(), F.linear(x.detach(), layer.weight, layer.bias))  # torch's kernel, not ours
    assert x.grad is not None and layer.weight.grad is not None
