"""The benchmarks' FLOP and byte counters and report plumbing (no GPU needed; nothing is timed)."""
from __future__ import annotations

import pytest
import torch

from minigpt_kernels.reference import attention_mask

from benchmarks import bench_attention, bench_layer_norm
from benchmarks.common import add_speedups, require_cuda
from scripts import run_all


@pytest.mark.parametrize("T", [1, 2, 7, 64, 300])
@pytest.mark.parametrize("window", [None, 1, 3, 64, 256, 1000])
def test_band_pairs_counts_the_mask(T, window):
    assert bench_attention.band_pairs(T, window) == int(attention_mask(T, True, window).sum())


def test_attention_flops_follow_the_convention():
    B, H, T, D = 2, 3, 1024, 64
    dense = 4 * B * H * T * T * D
    assert bench_attention.attention_flops(B, H, T, D, False, None, "fwd") == dense
    assert bench_attention.attention_flops(B, H, T, D, True, None, "fwd") == dense / 2
    assert bench_attention.attention_flops(B, H, T, D, True, None, "bwd") == 2.5 * dense / 2
    assert bench_attention.attention_flops(B, H, T, D, True, None, "fwd+bwd") == 3.5 * dense / 2
    w = 256
    band = w * (w + 1) // 2 + (T - w) * w
    assert bench_attention.attention_flops(B, H, T, D, True, w, "fwd") == 4 * B * H * D * band


def test_layer_norm_bytes_count_each_tensor_once():
    rows, n = 8192, 768
    act, stats = rows * n * 2, 2 * rows * 4
    fwd = act + 2 * n * 2 + act + stats  # x, weight, bias -> y, mean, rstd
    bwd = 2 * act + n * 2 + stats + act + 2 * n * 2  # x, dy, weight, mean, rstd -> dx, dweight, dbias
    assert bench_layer_norm.layer_norm_bytes(rows, n, torch.bfloat16, "fwd") == fwd
    assert bench_layer_norm.layer_norm_bytes(rows, n, torch.bfloat16, "bwd") == bwd
    assert bench_layer_norm.layer_norm_bytes(rows, n, torch.bfloat16, "fwd+bwd") == fwd + bwd
    no_bias = bench_layer_norm.layer_norm_bytes(rows, n, torch.float32, "fwd", has_bias=False)
    assert no_bias == 2 * rows * n * 4 + n * 4 + stats


def test_report_plumbing_renders_without_a_gpu():
    rows = [
        {"shape": "s", "mask": "causal", "mode": "fwd", "provider": "triton", "ms": 2.0},
        {"shape": "s", "mask": "causal", "mode": "fwd", "provider": "sdpa_flash", "ms": 3.0},
        {"shape": "s", "mask": "banded", "mode": "fwd", "provider": "triton", "ms": 0.5},
        {"shape": "s", "mask": "banded", "mode": "fwd", "provider": "flex", "error": "OutOfMemoryError"},
    ]
    add_speedups(rows, ("shape", "mask", "mode"))
    assert rows[0]["speedup_vs_sdpa_flash"] == 1.5
    summary = run_all.banded_vs_dense(rows)
    assert summary == [{"shape": "s", "mode": "fwd", "dense_ms": 2.0, "banded_ms": 0.5, "speedup": 4.0}]
    report = {
        "environment": {"device": "d", "torch": "t", "triton": "tr", "cuda": "c", "commit": "x", "date": "now"},
        "ceilings": {"matmul_size": 8192, "matmul_bf16_tflops": 700.0, "copy_gbps": 3000.0},
        "dtype": "bfloat16", "attention": rows, "banded_vs_dense": summary, "layer_norm": [],
    }
    text = run_all.render_markdown(report)
    assert "| s | causal | fwd | triton | 2 |" in text and "OutOfMemoryError" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_benchmarks_exit_with_a_message_without_cuda():
    with pytest.raises(SystemExit, match="benchmarks need a CUDA device"):
        require_cuda()
