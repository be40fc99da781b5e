"""Timing, memory, device ceilings and environment records shared by the benchmarks.

Benchmarks never assert: they measure and report. Every number is a median over
``triton.testing.do_bench`` repetitions after warm-up, with the L2 cache flushed
between repetitions (do_bench does that).
"""
from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def require_cuda() -> None:
    """Exit with a clear message when there is no CUDA device: timings need one."""
    if not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks need a CUDA device and none is available (torch.cuda.is_available() is False). "
            "Triton's CPU interpreter is for correctness tests only; its timings mean nothing."
        )


def bench_ms(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None, quick: bool = False) -> float:
    """Median milliseconds of ``fn`` over do_bench's repetitions (after warm-up).

    Without CUDA (``scripts/gpu_suite.py --smoke``) do_bench has no device to time on, so a
    few wall-clock calls stand in: that keeps the benchmark code paths runnable in CI, and
    the numbers it gives mean nothing.
    """
    if not torch.cuda.is_available():
        times = []
        for _ in range(3):
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        return statistics.median(times) * 1e3
    import triton.testing

    warmup, rep = (5, 20) if quick else (25, 100)
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def peak_memory_mib(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory allocated while running ``fn`` once, above what was allocated before, in MiB.

    None without CUDA: the CPU allocator keeps no such statistics.
    """
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def default_device() -> str:
    """"cuda" when a GPU is visible, else "cpu" (only for the suite's smoke mode)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _matmul_tflops(n: int, quick: bool, device: str) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / (bench_ms(lambda: a @ b, quick=quick) * 1e-3) / 1e12


def _copy_gbps(n_bytes: int, quick: bool, device: str) -> float:
    src = torch.empty(n_bytes, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * n_bytes / (bench_ms(lambda: dst.copy_(src), quick=quick) * 1e-3) / 1e9  # read + write


def measure_ceilings(
    quick: bool = False, matmul_size: int | None = None, copy_bytes: int | None = None, device: str = "cuda"
) -> dict[str, float]:
    """Measured device ceilings: a large bf16 matmul (TFLOP/s) and a large device-to-device copy (GB/s).

    These are what the kernels' throughput is reported as a fraction of. They are
    measured here, not taken from a spec sheet. ``matmul_size`` and ``copy_bytes``
    override the defaults (the suite's smoke mode uses tiny ones on the CPU).
    """
    n = matmul_size or (4096 if quick else 8192)
    n_bytes = copy_bytes or (2**28 if quick else 2**30)  # 256 MiB / 1 GiB, far beyond L2
    ceilings = {
        "matmul_bf16_tflops": _matmul_tflops(n, quick, device),
        "matmul_size": n,
        "copy_gbps": _copy_gbps(n_bytes, quick, device),
        "copy_bytes": n_bytes,
    }
    torch.cuda.empty_cache()
    return ceilings


def git_commit() -> str:
    """The repository's HEAD commit (with "-dirty" if the tree has changes), or "unknown"."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, str]:
    """Device, library versions, commit and date to store with every result."""
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_case(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None, quick: bool) -> dict[str, object]:
    """Time ``fn`` and measure its peak memory; an error (e.g. out of memory) is recorded, not raised."""
    try:
        ms = bench_ms(fn, grad_to_none=grad_to_none, quick=quick)
        mem = peak_memory_mib(fn)
        return {"ms": ms, "peak_mem_mib": mem}
    except Exception as err:  # noqa: BLE001 - a failing baseline must not stop the sweep
        torch.cuda.empty_cache()
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]}


def markdown_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    """Render ``rows`` as a GitHub markdown table with the given columns (missing cells blank)."""

    def cell(value: object) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def add_speedups(rows: list[dict[str, object]], key: tuple[str, ...], ours: str = "triton") -> None:
    """Give each of our rows ``speedup_vs_<provider>`` = provider ms / our ms, per ``key`` group.

    A value above 1 means our kernel is faster than that baseline in the same run.
    """
    groups: dict[tuple[object, ...], dict[str, dict[str, object]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in key), {})[str(r["provider"])] = r
    for by_provider in groups.values():
        mine = by_provider.get(ours)
        if mine is None or "ms" not in mine:
            continue
        for name, other in by_provider.items():
            if name != ours and "ms" in other:
                mine[f"speedup_vs_{name}"] = float(other["ms"]) / float(mine["ms"])
