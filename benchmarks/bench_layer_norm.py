"""LayerNorm benchmark: minigpt_kernels.layer_norm against F.layer_norm (eager and torch.compile'd).

Run from the repository root (needs CUDA):

    python -m benchmarks.bench_layer_norm [--quick] [--dtype bfloat16]

Bandwidth counts the bytes a pass must move at minimum (each tensor read or
written once), see ``layer_norm_bytes``; it is reported as GB/s and as a fraction
of a measured device-to-device copy.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import add_speedups, environment, markdown_table, measure_ceilings, require_cuda, run_case

SHAPES = [(8192, 768), (16384, 4096)]  # (rows, width)
QUICK_SHAPES = SHAPES[:1]
MODES = ("fwd", "bwd", "fwd+bwd")
STATS_BYTES = 4  # mean and rstd are float32


def layer_norm_bytes(
    rows: int, width: int, dtype: torch.dtype, mode: str, has_bias: bool = True, param_dtype: torch.dtype | None = None
) -> int:
    """Minimum bytes read plus written by one LayerNorm pass.

    fwd: read x, weight (and bias); write y, mean, rstd.
    bwd: read x, dy, weight, mean, rstd; write dx, dweight (and dbias).
    fwd+bwd: the sum of both.
    """
    e = torch.empty((), dtype=dtype).element_size()
    p = torch.empty((), dtype=param_dtype or dtype).element_size()
    n_params = 2 if has_bias else 1
    act = rows * width * e
    stats = 2 * rows * STATS_BYTES
    fwd = act + n_params * width * p + act + stats
    bwd = 2 * act + width * p + stats + act + n_params * width * p
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _providers() -> dict:
    from minigpt_kernels import layer_norm

    compiled = torch.compile(F.layer_norm)
    return {
        "triton": lambda x, w, b: layer_norm(x, w, b),
        "torch": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b),
        "torch_compile": lambda x, w, b: compiled(x, (x.shape[-1],), w, b),
    }


def _case(f, x, w, b, mode: str, quick: bool) -> dict:
    grads = [x, w, b]
    if mode == "fwd":
        return run_case(lambda: f(x, w, b), None, quick)
    dy = torch.randn_like(x)
    if mode == "bwd":
        y = f(x, w, b)
        result = run_case(lambda: y.backward(dy, retain_graph=True), grads, quick)
        del y
        return result
    return run_case(lambda: f(x, w, b).backward(dy), grads, quick)


def run(
    dtype: torch.dtype = torch.bfloat16,
    quick: bool = False,
    ceilings: dict | None = None,
    shapes: list[tuple[int, int]] | None = None,
    device: str = "cuda",
) -> list[dict]:
    """Time every provider on every (shape, mode); returns one row per measurement.

    ``shapes`` (rows, width) overrides the sweep; ``device="cpu"`` (under TRITON_INTERPRET=1)
    only exercises the code paths, for ``scripts/gpu_suite.py --smoke``.
    """
    if device == "cuda":
        require_cuda()
    ceilings = ceilings or measure_ceilings(quick, device=device)
    rows: list[dict] = []
    for n_rows, width in shapes or (QUICK_SHAPES if quick else SHAPES):
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n_rows, width, device=device, dtype=dtype, generator=gen).requires_grad_()
        w = torch.randn(width, device=device, dtype=dtype, generator=gen).requires_grad_()
        b = torch.randn(width, device=device, dtype=dtype, generator=gen).requires_grad_()
        for provider, f in _providers().items():
            for mode in MODES:
                row = {
                    "kernel": "layer_norm", "shape": f"{n_rows}x{width}", "mode": mode, "provider": provider,
                    "dtype": str(dtype).removeprefix("torch."),
                }
                row.update(_case(f, x, w, b, mode, quick))
                if "ms" in row:
                    row["gbps"] = layer_norm_bytes(n_rows, width, dtype, mode) / (row["ms"] * 1e-3) / 1e9
                    row["frac_of_copy_bw"] = row["gbps"] / ceilings["copy_gbps"]
                rows.append(row)
                result = f"{row['ms']:.3f} ms  {row['gbps']:.0f} GB/s" if "ms" in row else row["error"]
                print(f"layer_norm {row['shape']} {mode:8s} {provider:13s} {result}", flush=True)
        del x, w, b
        torch.cuda.empty_cache()
    add_speedups(rows, ("shape", "mode"))
    return rows


TABLE_COLUMNS = [
    "shape", "mode", "provider", "ms", "gbps", "frac_of_copy_bw", "peak_mem_mib",
    "speedup_vs_torch", "speedup_vs_torch_compile", "error",
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
