"""CPU attention benchmark: a banded layer against a dense causal one, through minigpt.ops.

Run from the repository root (no GPU needed):

    python -m benchmarks.bench_attention_cpu [--quick] [--out benchmarks/results]

This is what a GPT-3 layer costs on the ``sdpa`` and ``math`` backends, where a banded
layer attends in query blocks of w/2 against 1.5w keys (``ops.banded_attention``). Default
shape: B=1, H=4, D=64, T=4096, w=256, float32, 2 threads. The cases are timed in
interleaved rounds (dense, banded, dense, ...) so that load from other processes hits
them alike; we report the median and the minimum over rounds. Peak extra memory is the
highest running total of the CPU allocations torch's profiler records during one call
(inputs excluded). Benchmarks never assert.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from minigpt import ops

SHAPE = (1, 4, 4096, 64)  # (B, H, T, D)
WINDOW = 256


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak of the running sum of CPU allocations made while ``fn`` runs, in MiB."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start
    )
    total = peak = 0
    for e in events:
        total += e.self_cpu_memory_usage
        peak = max(peak, total)
    return peak / 2**20


def _call(q, k, v, window: int | None, backend: str, mode: str) -> Callable[[], object]:
    def fwd():
        with torch.no_grad():
            return ops.causal_attention(q, k, v, window=window, scale=q.shape[-1] ** -0.5, backend=backend)[0]

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        out, _ = ops.causal_attention(q, k, v, window=window, scale=q.shape[-1] ** -0.5, backend=backend)
        out.sum().backward()

    return fwd if mode == "fwd" else fwd_bwd


def run(shape=SHAPE, window: int = WINDOW, rounds: int = 7, threads: int = 2) -> list[dict]:
    torch.set_num_threads(threads)
    B, H, T, D = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=gen).requires_grad_() for _ in range(3))
    rows = []
    for backend in ("sdpa", "math"):
        for mode in ("fwd", "fwd+bwd"):
            cases = {name: _call(q, k, v, w, backend, mode) for name, w in (("dense", None), ("banded", window))}
            times: dict[str, list[float]] = {name: [] for name in cases}
            for fn in cases.values():
                fn()  # warm-up
            for _ in range(rounds):
                for name, fn in cases.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1e3)
            for name, fn in cases.items():
                rows.append({
                    "backend": backend, "mode": mode, "mask": name, "window": window if name == "banded" else None,
                    "shape": f"{B}x{H}x{T}x{D}", "median_ms": statistics.median(times[name]),
                    "min_ms": min(times[name]), "peak_extra_mib": peak_extra_mib(fn),
                })
            dense, banded = rows[-2], rows[-1]
            banded["speedup_vs_dense_median"] = dense["median_ms"] / banded["median_ms"]
            banded["speedup_vs_dense_min"] = dense["min_ms"] / banded["min_ms"]
            print(f"{backend:5s} {mode:8s} dense {dense['median_ms']:8.1f} ms {dense['peak_extra_mib']:7.1f} MiB | "
                  f"banded {banded['median_ms']:8.1f} ms {banded['peak_extra_mib']:7.1f} MiB | "
                  f"{banded['speedup_vs_dense_median']:.2f}x", flush=True)
    return rows


def to_markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "# CPU attention: banded vs dense causal (minigpt.ops)", "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
        "| backend | mode | mask | median ms | min ms | peak extra MiB | speedup (median) | speedup (min) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        sp = f"{r['speedup_vs_dense_median']:.2f}x" if "speedup_vs_dense_median" in r else ""
        sm = f"{r['speedup_vs_dense_min']:.2f}x" if "speedup_vs_dense_min" in r else ""
        mask = r["mask"] + (f" w={r['window']}" if r["window"] else "")
        lines.append(f"| {r['backend']} | {r['mode']} | {mask} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
                     f"{r['peak_extra_mib']:.1f} | {sp} | {sm} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T=512, w=64, 2 rounds (a smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="folder for attention_cpu.json and .md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    shape, window, rounds = ((1, 4, 512, 64), 64, 2) if args.quick else (SHAPE, WINDOW, args.rounds)
    env = {"torch": torch.__version__, "threads": args.threads, "dtype": "float32",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    rows = run(shape, window, rounds, args.threads)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention_cpu.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
        (args.out / "attention_cpu.md").write_text(to_markdown(rows, env))


if __name__ == "__main__":
    main()
