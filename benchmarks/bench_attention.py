"""Attention benchmark: minigpt_kernels.attention against SDPA (flash, cuDNN), FlexAttention and the math reference.

Run from the repository root (needs CUDA):

    python -m benchmarks.bench_attention [--quick] [--dtype bfloat16]

FLOPs follow the usual FlashAttention convention: a forward pass costs
4 * B * H * T * T * D (two matmuls of 2 * T * T * D each), halved for causal; a
backward pass costs 2.5x the forward (five matmuls instead of two). Banded
attention counts only the (query, key) pairs inside the band:
4 * B * H * D * band_pairs(T, w).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import add_speedups, environment, markdown_table, measure_ceilings, require_cuda, run_case

SHAPES = [(8, 12, 1024, 64), (4, 16, 4096, 128), (1, 16, 16384, 128)]  # (B, H, T, D)
QUICK_SHAPES = SHAPES[:1]
MASKS = [("causal", None), ("banded", 256)]  # (name, window)
MODES = ("fwd", "bwd", "fwd+bwd")
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
MATH_MAX_T = 4096  # the reference materialises (B, H, T, T) float32 scores; beyond this it will not fit


def band_pairs(seq_len: int, window: int | None) -> int:
    """Number of causal (query, key) pairs with ``i - window < j <= i``; all causal pairs if window is None."""
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    # Rows 0..w-1 see i+1 keys; rows w..T-1 see w keys each.
    return window * (window + 1) // 2 + (seq_len - window) * window


def attention_flops(B: int, H: int, T: int, D: int, causal: bool, window: int | None, mode: str) -> float:
    """FLOPs credited to one attention call (see the module docstring for the convention)."""
    if window is not None:
        fwd = 4.0 * B * H * D * band_pairs(T, window)
    else:
        fwd = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
    return fwd * MODE_FLOP_FACTOR[mode]


def _providers(T: int, window: int | None, scale: float, device: str = "cuda", flex: bool = True,
               math_max_t: int = MATH_MAX_T) -> dict[str, Callable]:
    """name -> f(q, k, v) for every implementation that can run this case (FlexAttention only
    when `flex`: it is compiled anew for every length and mask, the costliest part of a sweep)."""
    from minigpt_kernels import attention, attention_reference

    providers: dict[str, Callable] = {
        "triton": lambda q, k, v: attention(q, k, v, causal=True, window=window, scale=scale),
    }
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        sdpa_kernel = None
    if sdpa_kernel is not None and window is None:
        # SDPA's fused backends take no band mask, so they only join the dense causal runs.
        def sdpa_with(backend):
            def run(q, k, v):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

            return run

        for name, backend in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_cudnn", "CUDNN_ATTENTION")):
            if hasattr(SDPBackend, backend):
                providers[name] = sdpa_with(getattr(SDPBackend, backend))
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        flex_attention = None
    if flex_attention is not None and flex:
        def mask_mod(b, h, q_idx, kv_idx):
            allowed = q_idx >= kv_idx
            if window is not None:
                allowed = allowed & (q_idx - kv_idx < window)
            return allowed

        block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
        flex = torch.compile(flex_attention, dynamic=False)
        providers["flex"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale)
    if T <= math_max_t:
        providers["math"] = lambda q, k, v: attention_reference(q, k, v, causal=True, window=window, scale=scale)
    return providers


def _case(f: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, quick: bool) -> dict:
    grads = [q, k, v]
    if mode == "fwd":
        return run_case(lambda: f(q, k, v), None, quick)
    if mode == "bwd":
        try:
            out = f(q, k, v)
        except Exception as err:  # noqa: BLE001 - recorded like any other failure
            return {"error": f"{type(err).__name__}: {err}"[:200]}
        do = torch.randn_like(out)
        result = run_case(lambda: out.backward(do, retain_graph=True), grads, quick)
        del out
        return result
    do = torch.randn_like(q)
    return run_case(lambda: f(q, k, v).backward(do), grads, quick)


def run(
    dtype: torch.dtype = torch.bfloat16,
    quick: bool = False,
    ceilings: dict | None = None,
    shapes: list[tuple[int, int, int, int]] | None = None,
    device: str = "cuda",
    flex_lengths: set[int] | None = None,
    math_max_t: int = MATH_MAX_T,
) -> list[dict]:
    """Time every provider on every (shape, mask, mode); returns one row per measurement.

    ``shapes`` (B, H, T, D) overrides the sweep; ``device="cpu"`` (under TRITON_INTERPRET=1)
    only exercises the code paths, for ``scripts/gpu_suite.py --smoke``. ``flex_lengths``
    limits FlexAttention to those lengths (None: every one) and ``math_max_t`` the math
    reference (the GPU suite's 7-minute command keeps both to what its targets need).
    """
    if device == "cuda":
        require_cuda()
    ceilings = ceilings or measure_ceilings(quick, device=device)
    rows: list[dict] = []
    for B, H, T, D in shapes or (QUICK_SHAPES if quick else SHAPES):
        for mask_name, window in MASKS:
            scale = D**-0.5
            gen = torch.Generator(device=device).manual_seed(0)
            q, k, v = (
                torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen).requires_grad_()
                for _ in range(3)
            )
            flex = flex_lengths is None or T in flex_lengths
            for provider, f in _providers(T, window, scale, device, flex, math_max_t).items():
                for mode in MODES:
                    row = {
                        "kernel": "attention", "shape": f"{B}x{H}x{T}x{D}", "mask": mask_name, "window": window,
                        "mode": mode, "provider": provider, "dtype": str(dtype).removeprefix("torch."),
                    }
                    row.update(_case(f, q, k, v, mode, quick))
                    if "ms" in row:
                        flops = attention_flops(B, H, T, D, True, window, mode)
                        row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                        row["frac_of_matmul_peak"] = row["tflops"] / ceilings["matmul_bf16_tflops"]
                    rows.append(row)
                    print(_progress(row), flush=True)
            del q, k, v
            torch.cuda.empty_cache()
    add_speedups(rows, ("shape", "mask", "mode"))
    return rows


def _progress(row: dict) -> str:
    result = f"{row['ms']:.3f} ms  {row['tflops']:.1f} TFLOP/s" if "ms" in row else row["error"]
    return f"attention {row['shape']} {row['mask']:7s} {row['mode']:8s} {row['provider']:11s} {result}"


TABLE_COLUMNS = [
    "shape", "mask", "mode", "provider", "ms", "tflops", "frac_of_matmul_peak", "peak_mem_mib",
    "speedup_vs_sdpa_flash", "speedup_vs_sdpa_cudnn", "speedup_vs_flex", "speedup_vs_math", "error",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape, short timing runs (a smoke test)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    require_cuda()
    print(environment())
    rows = run(getattr(torch, args.dtype), args.quick)
    print(markdown_table(rows, TABLE_COLUMNS))


if __name__ == "__main__":
    main()
