"""minigpt_kernels.layer_norm and minigpt_kernels.LayerNorm against the float64 reference and torch.nn.LayerNorm."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_rel_close

from minigpt_kernels import LayerNorm, layer_norm, layer_norm_reference
from minigpt_kernels.layer_norm import max_width

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# LayerNorm has no tl.dot, so bfloat16 runs correctly under the interpreter too.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["float32", "float16", "bfloat16"]


def _check_layer_norm(shape, dtype, has_bias, seed, param_dtype=None, make_x=None):
    param_dtype = param_dtype or dtype
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g).to(DEVICE, dtype) if make_x is None else make_x(g).to(DEVICE, dtype)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(DEVICE, param_dtype)
    b = torch.randn(n, generator=g).to(DEVICE, param_dtype) if has_bias else None
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)

    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    bk = b.clone().requires_grad_() if has_bias else None
    y = layer_norm(xk, wk, bk)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    br = b.double().requires_grad_() if has_bias else None
    ref = layer_norm_reference(xr, wr, br)
    assert y.dtype == dtype and y.shape == x.shape
    assert_rel_close(y, ref, dtype, "y")

    y.backward(dy)
    ref.backward(dy.double())
    assert xk.grad.dtype == dtype and wk.grad.dtype == param_dtype
    assert_rel_close(xk.grad, xr.grad, dtype, "dx")
    assert_rel_close(wk.grad, wr.grad, dtype, "dweight")
    if has_bias:
        assert_rel_close(bk.grad, br.grad, dtype, "dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("width", [1, 7, 768, 1000, 4097])
def test_layer_norm_fwd_bwd_matches_reference(width, dtype):
    _check_layer_norm((5, width), dtype, has_bias=True, seed=width)


@pytest.mark.parametrize("shape", [(3, 4, 33), (2, 1, 3, 128), (256,)])
def test_layer_norm_fwd_bwd_matches_reference_leading_dims_without_bias(shape):
    _check_layer_norm(shape, torch.float32, has_bias=False, seed=len(shape))


@pytest.mark.parametrize("has_bias", [True, False])
def test_layer_norm_fwd_bwd_matches_reference_wide_rows(has_bias):
    # Width 12288 (gpt3-175b) takes the two-pass, column-chunked backward
    # (_layer_norm_bwd_dx_wide_kernel); 9 rows give each program several rows to add.
    _check_layer_norm((9, 12288), torch.float32, has_bias=has_bias, seed=12)


def test_layer_norm_fwd_bwd_matches_reference_float32_params_bfloat16_input():
    _check_layer_norm((6, 96), torch.bfloat16, has_bias=True, seed=1, param_dtype=torch.float32)


def test_layer_norm_fwd_bwd_matches_reference_strided_columns():
    # (rows, N) transposed out of (N, rows): the column stride is not 1.
    def make_x(g):
        return torch.randn(40, 9, generator=g).t()

    _check_layer_norm((9, 40), torch.float32, has_bias=True, seed=2, make_x=make_x)


@given(
    leading=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    width=st.integers(1, 1500),
    dtype=st.sampled_from(DTYPES),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_layer_norm_fwd_bwd_matches_reference_random_shapes(leading, width, dtype, has_bias, seed):
    _check_layer_norm((*leading, width), dtype, has_bias, seed)


def test_layer_norm_bwd_is_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 300, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(300, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(300, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(37, 300, generator=g).to(DEVICE)
    grads = []
    for _ in range(2):
        x.grad = w.grad = b.grad = None
        layer_norm(x, w, b).backward(dy)
        grads.append((x.grad.clone(), w.grad.clone(), b.grad.clone()))
    for first, second in zip(*grads, strict=True):
        assert torch.equal(first, second)


def test_layer_norm_bwd_accepts_broadcast_grad_output():
    x = torch.randn(4, 3, 50, device=DEVICE, requires_grad=True)
    w = torch.randn(50, device=DEVICE, requires_grad=True)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    layer_norm(x, w, None).sum().backward()  # dy has all strides zero
    layer_norm_reference(xr, wr, None).sum().backward()
    assert_rel_close(x.grad, xr.grad, torch.float32, "dx")
    assert_rel_close(w.grad, wr.grad, torch.float32, "dweight")


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_module_is_a_drop_in_for_torch_layer_norm(bias):
    torch_ln = torch.nn.LayerNorm(48, eps=1e-6, bias=bias).to(DEVICE)
    with torch.no_grad():
        torch_ln.weight.normal_()
        if bias:
            torch_ln.bias.normal_()
    ours = LayerNorm(48, eps=1e-6, bias=bias).to(DEVICE)
    assert ours.state_dict().keys() == torch_ln.state_dict().keys()
    ours.load_state_dict(torch_ln.state_dict())
    assert_rel_close(ours.weight, torch_ln.weight, torch.float32, "weight")

    x = torch.randn(2, 5, 48, device=DEVICE)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yt = ours(xo), torch_ln(xt)
    assert_rel_close(yo, yt, torch.float32, "y")
    dy = torch.randn_like(yo)
    yo.backward(dy)
    yt.backward(dy)
    assert_rel_close(xo.grad, xt.grad, torch.float32, "dx")
    assert_rel_close(ours.weight.grad, torch_ln.weight.grad, torch.float32, "dweight")
    if bias:
        assert_rel_close(ours.bias.grad, torch_ln.bias.grad, torch.float32, "dbias")
    torch_ln.load_state_dict(ours.state_dict())  # and back


def test_layer_norm_module_initialises_like_torch():
    ours, theirs = LayerNorm(10), torch.nn.LayerNorm(10)
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    assert ours.normalized_shape == theirs.normalized_shape and ours.eps == theirs.eps


# --- validation -------------------------------------------------------------


def test_layer_norm_rejects_unsupported_dtype():
    x = torch.randn(2, 8, device=DEVICE, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x\.dtype=torch\.float64 is not supported"):
        layer_norm(x, torch.ones(8, device=DEVICE, dtype=torch.float64), None)


def test_layer_norm_rejects_mismatched_weight():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\); expected \(8,\)"):
        layer_norm(x, torch.ones(7, device=DEVICE), None)


def test_layer_norm_rejects_too_wide_rows():
    n = max_width(torch.float32) + 1
    x = torch.randn(1, n, device=DEVICE)
    with pytest.raises(ValueError, match=rf"x\.shape\[-1\]={n} exceeds"):
        layer_norm(x, torch.ones(n, device=DEVICE), None)


def test_layer_norm_rejects_leading_dims_that_need_a_copy():
    x = torch.randn(4, 6, 8, device=DEVICE).transpose(0, 1)
    with pytest.raises(ValueError, match=r"cannot be viewed as \(rows, 8\) without a copy"):
        layer_norm(x, torch.ones(8, device=DEVICE), None)


def test_layer_norm_rejects_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"x is on device cpu.*TRITON_INTERPRET=1"):
        layer_norm(torch.randn(2, 8), torch.ones(8), None)
