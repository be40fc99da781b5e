"""Run every kernel benchmark and write the results as JSON and a markdown table (and a PNG with --plot).

Run from the repository root (needs CUDA):

    python -m scripts.run_all --out benchmarks/results [--quick] [--plot] [--dtype bfloat16]

Writes ``<out>/results.json`` (environment, measured ceilings, every row) and
``<out>/results.md``. Nothing here passes or fails: it reports.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks import bench_attention, bench_layer_norm
from benchmarks.common import environment, markdown_table, measure_ceilings, require_cuda


def banded_vs_dense(rows: list[dict]) -> list[dict]:
    """Our banded (w=256) time against our dense causal time, per shape and mode."""
    ours = {(r["shape"], r["mask"], r["mode"]): r for r in rows if r["provider"] == "triton" and "ms" in r}
    summary = []
    for (shape, mask, mode), r in ours.items():
        dense = ours.get((shape, "causal", mode))
        if mask == "banded" and dense is not None:
            summary.append({"shape": shape, "mode": mode, "dense_ms": dense["ms"], "banded_ms": r["ms"],
                            "speedup": dense["ms"] / r["ms"]})
    return summary


def render_markdown(report: dict) -> str:
    env, ceil = report["environment"], report["ceilings"]
    parts = [
        "# Kernel benchmarks",
        "",
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
        f"commit {env['commit']}; {env['date']}; dtype {report['dtype']}.",
        "",
        f"Measured ceilings: bf16 matmul ({ceil['matmul_size']}^3) {ceil['matmul_bf16_tflops']:.0f} TFLOP/s; "
        f"device-to-device copy {ceil['copy_gbps']:.0f} GB/s (read + write).",
        "",
        "Times are do_bench medians in ms. `speedup_vs_X` = X's time / our time (above 1: ours is faster).",
        "",
        "## Attention",
        "",
        markdown_table(report["attention"], bench_attention.TABLE_COLUMNS),
        "",
        "### Banded (w=256) against dense causal, both ours",
        "",
        markdown_table(report["banded_vs_dense"], ["shape", "mode", "dense_ms", "banded_ms", "speedup"]),
        "",
        "## LayerNorm",
        "",
        markdown_table(report["layer_norm"], bench_layer_norm.TABLE_COLUMNS),
        "",
    ]
    return "\n".join(parts)


def plot(report: dict, path: Path) -> None:
    """Bar charts of attention TFLOP/s and LayerNorm GB/s per case and provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(14, 10))
    for ax, rows, metric, label in (
        (axes[0], report["attention"], "tflops", "attention TFLOP/s"),
        (axes[1], report["layer_norm"], "gbps", "LayerNorm GB/s"),
    ):
        cases = sorted({(r["shape"], r.get("mask", ""), r["mode"]) for r in rows})
        providers = sorted({r["provider"] for r in rows})
        width = 0.8 / max(len(providers), 1)
        for i, provider in enumerate(providers):
            values = {(r["shape"], r.get("mask", ""), r["mode"]): r.get(metric, 0.0)
                      for r in rows if r["provider"] == provider}
            ax.bar([c + i * width for c in range(len(cases))], [values.get(c, 0.0) for c in cases],
                   width=width, label=provider)
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
        ax.set_xticklabels([" ".join(x for x in c if x) for c in cases], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['environment']['device']}, {report['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="one shape per kernel, short timing runs")
    parser.add_argument("--plot", action="store_true", help="also write results.png (needs matplotlib)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    require_cuda()

    dtype = getattr(torch, args.dtype)
    ceilings = measure_ceilings(args.quick)
    print(f"ceilings: {ceilings}", flush=True)
    attention_rows = bench_attention.run(dtype, args.quick, ceilings)
    layer_norm_rows = bench_layer_norm.run(dtype, args.quick, ceilings)
    report = {
        "environment": environment(),
        "dtype": args.dtype,
        "quick": args.quick,
        "ceilings": ceilings,
        "attention": attention_rows,
        "banded_vs_dense": banded_vs_dense(attention_rows),
        "layer_norm": layer_norm_rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    (args.out / "results.md").write_text(render_markdown(report))
    if args.plot:
        plot(report, args.out / "results.png")
    print(render_markdown(report))
    print(f"wrote {args.out}/results.json and results.md" + (" and results.png" if args.plot else ""))


if __name__ == "__main__":
    main()
