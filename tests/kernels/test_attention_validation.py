"""The attention launcher rejects what the kernels cannot run, with a message that says why."""
from __future__ import annotations

import pytest
import torch

from minigpt_kernels import attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(shape=(1, 2, 8, 16), dtype=torch.float32):
    return tuple(torch.randn(shape, device=DEVICE).to(dtype) for _ in range(3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_attention_rejects_unsupported_dtype(dtype):
    q, k, v = _qkv(dtype=dtype)
    with pytest.raises(ValueError, match=r"q\.dtype=torch\.(float64|int32) is not supported.*float32"):
        attention(q, k, v)


@pytest.mark.parametrize("head_dim", [8, 12, 100, 264])
def test_attention_rejects_unsupported_head_dim(head_dim):
    q, k, v = _qkv(shape=(1, 1, 4, head_dim))
    with pytest.raises(ValueError, match=rf"head_dim={head_dim} is not supported; use a multiple of 8 from 16 to 256"):
        attention(q, k, v)


def test_attention_rejects_mismatched_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"k\.shape=\(1, 2, 9, 16\) must equal q\.shape=\(1, 2, 8, 16\)"):
        attention(q, torch.randn(1, 2, 9, 16, device=DEVICE), v)


def test_attention_rejects_mismatched_dtypes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"v\.dtype=torch\.float16 must equal q\.dtype=torch\.float32"):
        attention(q, k, v.half())


def test_attention_rejects_wrong_rank():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q has shape \(2, 8, 16\); attention expects 4 dims"):
        attention(q[0], k[0], v[0])


def test_attention_rejects_empty_sequence():
    q, k, v = _qkv(shape=(1, 2, 0, 16))
    with pytest.raises(ValueError, match="empty dimension"):
        attention(q, k, v)


@pytest.mark.parametrize("window", [0, -3])
def test_attention_rejects_window_below_one(window):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=rf"window={window} must be >= 1"):
        attention(q, k, v, window=window)


@pytest.mark.parametrize("window", [2.5, True])
def test_attention_rejects_non_int_window(window):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="must be an int >= 1 or None"):
        attention(q, k, v, window=window)


def test_attention_rejects_window_without_causal():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"window=4 with causal=False is not supported.*causal=True"):
        attention(q, k, v, causal=False, window=4)


def test_attention_rejects_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (torch.randn(1, 1, 4, 16) for _ in range(3))
    with pytest.raises(ValueError, match=r"q is on device cpu.*TRITON_INTERPRET=1"):
        attention(q, k, v)


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.5.2", True),   # the GPU machine's Triton and NumPy: its interpreter would break
    ("3.6.0", "2.4.0rc1", True),  # NumPy 2.4 expired the deprecation of int(array) for ndim > 0
    ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.5.2", False),  # Triton 3.7 converts with int(array.squeeze())
    ("3.9.0", "2.5.0", False),
])
def test_interpreter_refuses_a_triton_numpy_pair_it_cannot_run(monkeypatch, triton_version, numpy_version, refused):
    from minigpt_kernels import _common

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_common.triton, "__version__", triton_version)
    monkeypatch.setattr(_common.importlib.metadata, "version", lambda name: numpy_version)
    _common.interpreter_problem.cache_clear()
    try:
        q = torch.randn(1, 1, 4, 16)
        if refused:
            with pytest.raises(RuntimeError, match=rf"Triton {triton_version}'s interpreter .* NumPy {numpy_version}.*"
                                                   r"numpy<2.4 or triton>=3.7"):
                _common.check_device("q", q)
        else:
            _common.check_device("q", q)
    finally:
        _common.interpreter_problem.cache_clear()
