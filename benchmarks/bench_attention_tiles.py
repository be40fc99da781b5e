"""Attention tile sweep: each kernel pass (forward, dK/dV, dQ) timed at every candidate tile
configuration (block_m, block_n, warps, stages) on each benchmark shape, so that the
launchers' tiles (`minigpt_kernels.attention.attention_tiles`, today chosen by compiling, not
by timing) can later be chosen from data on a machine without a GPU.

    python -m benchmarks.bench_attention_tiles --out benchmarks/results   # needs CUDA
    python -m benchmarks.bench_attention_tiles --check-candidates --out benchmarks/results  # no GPU

Candidates: the launcher's own choice first, then a grid of power-of-two tiles
(CANDIDATES). `--check-candidates` compiles each for sm_90 without a GPU (as
scripts/compile_table.py does) and writes attention_tile_candidates_sm90.json: the sweep
skips a candidate that spills registers or needs more shared memory than Hopper's 227 KiB a
block, under the Triton that made the file (the lent GPU machine's, 3.6).

Compiling costs 1-4 s a kernel on a CPU core (compile_table_sm90*.md), and a sweep has a
few hundred, so the kernels are compiled first in parallel worker processes, each launching
every configuration once on a short sequence of the same batch, heads and head dim (Triton's
specialisation then matches), which fills Triton's on-disk cache; the timing process loads
them from there. Cells are then timed round-robin (every (shape, mask, pass) gets its first
candidates before any gets its last), so a sweep cut short by its budget is still even.
Every candidate's output is compared with the launcher's choice (max abs difference), so a
fast but wrong tile shows. Never asserts: it reports.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from benchmarks.bench_attention import SHAPES, attention_flops
from benchmarks.common import bench_ms, environment

MASKS = {"causal": None, "banded": 256}
PASSES = ("fwd", "bwd_dkdv", "bwd_dq")
SHARED_LIMIT_BYTES = 227 * 1024  # Hopper's largest shared memory a block can take
CANDIDATE_FILE = "attention_tile_candidates_sm90.json"
WARM_T = 512  # warm-up length: a multiple of 16 like every benchmark length, so kernels specialise alike


def _grid(block_ms, block_ns, warps=(4, 8), stages=(2, 3)) -> list[tuple[int, int, int, int]]:
    return [(m, n, w, s) for m in block_ms for n in block_ns for w in warps for s in stages]


CANDIDATES: dict[str, list[tuple[int, int, int, int]]] = {
    "fwd": _grid((64, 128), (32, 64, 128)),
    "bwd_dkdv": _grid((16, 32, 64), (64, 128)),
    "bwd_dq": _grid((64, 128), (32, 64)),
}
"""pass -> (block_m, block_n, num_warps, num_stages) candidates for 16-bit inputs on the GPU."""
SMOKE_CANDIDATES = {"fwd": [(32, 16, 4, 1)], "bwd_dkdv": [(16, 32, 4, 1)], "bwd_dq": [(32, 16, 4, 1)]}
SMOKE_SHAPES = [(1, 2, 64, 16)]


def _attn():
    import importlib

    return importlib.import_module("minigpt_kernels.attention")  # the module: the package's `attention` is the function


def _key(shape, mask: str, pass_name: str, cfg: tuple[int, int, int, int]) -> str:
    return f"{'x'.join(map(str, shape))}/{mask}/{pass_name}/{'x'.join(map(str, cfg))}"


def default_config(head_dim: int, dtype: torch.dtype, pass_name: str) -> tuple[int, int, int, int]:
    tiles = getattr(_attn().attention_tiles(head_dim, dtype), pass_name)
    return tiles.block_m, tiles.block_n, tiles.num_warps, tiles.num_stages


class PassRunner:
    """Inputs for one (shape, mask) and a callable per (pass, tile) that launches that pass alone."""

    def __init__(self, shape: tuple[int, int, int, int], window: int | None, dtype: torch.dtype, device: str):
        attn = _attn()
        B, H, T, D = shape
        gen = torch.Generator(device=device).manual_seed(0)
        self.q, self.k, self.v, self.do = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen)
                                           for _ in range(4))
        self.window, self.scale = window, D**-0.5
        defaults = attn.attention_tiles(D, dtype)
        self.o, self.lse = attn._attention_fwd(self.q, self.k, self.v, True, window, self.scale)
        self.delta = attn._attention_bwd_preprocess(self.o, self.do, defaults.bwd_dq)

    def launcher(self, pass_name: str, cfg: tuple[int, int, int, int]) -> Callable[[], torch.Tensor]:
        attn = _attn()
        tile = attn.TileConfig(*cfg)
        q, k, v, do, lse, delta, w, s = self.q, self.k, self.v, self.do, self.lse, self.delta, self.window, self.scale
        if pass_name == "fwd":
            return lambda: attn._attention_fwd(q, k, v, True, w, s, tiles=tile)[0]
        if pass_name == "bwd_dkdv":  # both outputs, so a tile that gets dV wrong shows too
            return lambda: torch.cat([g.flatten() for g in attn._attention_bwd_dkdv(q, k, v, do, lse, delta, True, w,
                                                                                    s, tile)])
        return lambda: attn._attention_bwd_dq(q, k, v, do, lse, delta, True, w, s, tile)


def _warm(jobs: list[tuple[tuple[int, int, int, int], str, str, tuple[int, int, int, int]]], dtype_name: str,
          device: str, warm_t: int) -> int:
    """Worker process: launch each (shape, mask, pass, tile) once at T=warm_t; Triton caches the binaries."""
    dtype, done = getattr(torch, dtype_name), 0
    runners: dict = {}
    for shape, mask, pass_name, cfg in jobs:
        B, H, _, D = shape
        small = (1, H, warm_t, D)
        try:
            if (small, mask) not in runners:
                runners[(small, mask)] = PassRunner(small, MASKS[mask], dtype, device)
            runners[(small, mask)].launcher(pass_name, cfg)()
            if device == "cuda":
                torch.cuda.synchronize()
            done += 1
        except Exception:  # noqa: BLE001 - the timing process records the error for this tile
            pass
    return done


def compile_in_parallel(jobs: list, dtype: torch.dtype, workers: int, budget_s: float, device: str = "cuda",
                        warm_t: int = WARM_T) -> dict:
    """Fill Triton's cache for `jobs` with `workers` processes, stopping at `budget_s`. Returns
    how many of the jobs the workers launched (a job that fails is left to the timing process)."""
    import concurrent.futures as cf
    import multiprocessing

    began = time.perf_counter()
    chunks = [jobs[i::workers] for i in range(workers)]
    done = 0
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(_warm, chunk, str(dtype).removeprefix("torch."), device, warm_t) for chunk in chunks if chunk]
    try:
        for future in cf.as_completed(futures, timeout=budget_s):
            done += future.result()
    except cf.TimeoutError:
        pass
    finally:  # workers still compiling at the budget are killed: the timing process compiles what is left
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()
    return {"jobs": len(jobs), "workers": workers, "compiled": done, "seconds": round(time.perf_counter() - began, 1)}


def allowed_candidates(results_dir: Path | None) -> set[str] | None:
    """'D/mask/pass/tile' keys that compile for sm_90 without spills and fit in shared memory,
    from CANDIDATE_FILE; None when the file is absent (every candidate is tried)."""
    path = (results_dir or Path(__file__).resolve().parent / "results") / CANDIDATE_FILE
    if not path.exists():
        return None
    return {r["key"] for r in json.loads(path.read_text())["rows"] if r.get("ok")}


def plan(shapes, dtype: torch.dtype, candidates: dict, allowed: set[str] | None) -> list[list[tuple]]:
    """Per (shape, mask, pass) cell, the tiles to time: the launcher's choice first."""
    cells = []
    for shape in shapes:
        D = shape[3]
        for mask in MASKS:
            for pass_name in PASSES:
                first = default_config(D, dtype, pass_name)
                tiles = [first] + [c for c in candidates[pass_name] if c != first
                                   and (allowed is None or f"{D}/{mask}/{pass_name}/{'x'.join(map(str, c))}" in allowed)]
                cells.append([(shape, mask, pass_name, cfg) for cfg in tiles])
    return cells


def round_robin(cells: list[list[tuple]]) -> Iterator[tuple]:
    for i in range(max(map(len, cells), default=0)):
        for cell in cells:
            if i < len(cell):
                yield cell[i]


def sweep(shapes=None, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", smoke: bool = False,
          budget_s: float = 80.0, workers: int = 8, save: Callable[[dict], None] | None = None,
          results_dir: Path | None = None) -> dict:
    """Time every planned tile; `save` gets the result after each row (the GPU suite's stage)."""
    began = time.perf_counter()
    shapes = shapes or (SMOKE_SHAPES if smoke else sorted(SHAPES, key=lambda s: -s[2]))
    candidates = SMOKE_CANDIDATES if smoke else CANDIDATES
    cells = plan(shapes, dtype, candidates, None if smoke else allowed_candidates(results_dir))
    jobs = list(round_robin(cells))
    result: dict = {"dtype": str(dtype).removeprefix("torch."), "planned": len(jobs), "rows": []}
    if device == "cuda" and workers > 0:
        result["compile"] = compile_in_parallel(jobs, dtype, workers, budget_s * 0.5)
    runners: dict = {}
    reference: dict = {}
    for shape, mask, pass_name, cfg in jobs:
        if time.perf_counter() - began > budget_s:
            result["stopped"] = f"budget of {budget_s:.0f} s spent after {len(result['rows'])} of {len(jobs)} tiles"
            break
        B, H, T, D = shape
        row = {"shape": "x".join(map(str, shape)), "mask": mask, "pass": pass_name, "block_m": cfg[0],
               "block_n": cfg[1], "num_warps": cfg[2], "num_stages": cfg[3],
               "default": cfg == default_config(D, dtype, pass_name)}
        try:
            if (shape, mask) not in runners:  # kept: the round-robin comes back to every (shape, mask)
                runners[(shape, mask)] = PassRunner(shape, MASKS[mask], dtype, device)
            fn = runners[(shape, mask)].launcher(pass_name, cfg)
            out = fn()
            ref = reference.setdefault((shape, mask, pass_name), out)
            row["max_abs_diff_vs_default"] = float((out.float() - ref.float()).abs().max())
            row["ms"] = bench_ms(fn, quick=True)
            share = {"fwd": 1.0, "bwd_dkdv": 1.5, "bwd_dq": 1.0}[pass_name]  # of the backward's 2.5x forward FLOPs
            row["tflops"] = attention_flops(B, H, T, D, True, MASKS[mask], "fwd") * share / (row["ms"] * 1e-3) / 1e12
        except Exception as err:  # noqa: BLE001 - a tile that fails is a row too
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
        result["rows"].append(row)
        if save is not None:
            save(result)
    result["seconds"] = round(time.perf_counter() - began, 1)
    result["best"] = best_tiles(result["rows"])
    return result


def best_tiles(rows: list[dict]) -> list[dict]:
    """Per (shape, mask, pass): the fastest tile that matches the default's output, beside the default."""
    out = []
    for key in dict.fromkeys((r["shape"], r["mask"], r["pass"]) for r in rows):
        cell = [r for r in rows if (r["shape"], r["mask"], r["pass"]) == key and "ms" in r]
        default = next((r for r in cell if r["default"]), None)
        good = [r for r in cell if r.get("max_abs_diff_vs_default", 1.0) < 0.05]
        if not good or default is None:
            continue
        best = min(good, key=lambda r: r["ms"])
        out.append({"shape": key[0], "mask": key[1], "pass": key[2],
                    "default": f"{default['block_m']}x{default['block_n']} w{default['num_warps']} s{default['num_stages']}",
                    "default_ms": default["ms"],
                    "best": f"{best['block_m']}x{best['block_n']} w{best['num_warps']} s{best['num_stages']}",
                    "best_ms": best["ms"], "speedup": default["ms"] / best["ms"], "timed": len(cell)})
    return out


def check_candidates(out: Path) -> list[dict]:
    """Compile every candidate for sm_90 (no GPU) and record whether it spills or overflows shared memory."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    os.environ.pop("TRITON_INTERPRET", None)
    import compile_table as ct

    attn = ct.attn
    kernels = {"fwd": attn._attention_fwd_kernel, "bwd_dkdv": attn._attention_bwd_dkdv_kernel,
               "bwd_dq": attn._attention_bwd_dq_kernel}
    f32 = {n: "*fp32" for n in ("LSE_ptr", "Delta_ptr")}
    rows = []
    for D in sorted({s[3] for s in SHAPES}):
        for mask, window in MASKS.items():
            for pass_name, fn in kernels.items():
                for cfg in CANDIDATES[pass_name]:
                    m, n, w, s = cfg
                    consts = dict(HEAD_DIM=D, BLOCK_D=attn._block_d(D), BLOCK_M=m, BLOCK_N=n, CAUSAL=True,
                                  WINDOW=window or 0, DOT_PRECISION="tf32", **ct._strides_one(fn))
                    row = {"key": f"{D}/{mask}/{pass_name}/{m}x{n}x{w}x{s}", "dtype": "bf16"}
                    row.update(ct._safe(ct.compile_one, fn, "bf16", consts, w, s, f32))
                    row["ok"] = ("error" not in row and row["spill_stores"] == 0
                                 and row["shared_bytes"] <= SHARED_LIMIT_BYTES)
                    rows.append(row)
                    print(row["key"], "ok" if row["ok"] else "dropped", row.get("registers"), row.get("spill_stores"),
                          row.get("shared_bytes"), row.get("error", ""), flush=True)
    env = {"triton": ct.triton.__version__, "torch": torch.__version__, "target": "sm_90"}
    out.mkdir(parents=True, exist_ok=True)
    (out / CANDIDATE_FILE).write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--check-candidates", action="store_true", help="compile the candidates for sm_90 (no GPU)")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds for the whole sweep")
    parser.add_argument("--workers", type=int, default=8, help="processes that compile before timing")
    args = parser.parse_args(argv)
    if args.check_candidates:
        rows = check_candidates(args.out)
        print(f"{sum(r['ok'] for r in rows)} of {len(rows)} candidates kept")
        return
    from benchmarks.common import require_cuda

    require_cuda()
    result = sweep(budget_s=args.budget, workers=args.workers, results_dir=args.out)
    result["environment"] = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_tiles.json").write_text(json.dumps(result, indent=2) + "\n")
    for row in result["best"]:
        print(row)


if __name__ == "__main__":
    main()
