"""Compile every kernel at every tile configuration its launcher can choose, for sm_90, without a GPU.

    python scripts/compile_table.py [--out benchmarks/results] [--quick]

Triton lowers each kernel to PTX for ``GPUTarget("cuda", 90, 32)`` (an H100); the
``ptxas`` shipped in Triton's wheel (triton/backends/nvidia/bin) then assembles it with
``-v``, which reports registers per thread, spill stores/loads and static shared memory;
Triton's own metadata gives the dynamic shared memory its pipelining uses. The table
covers attention (forward, dK/dV, dQ, preprocess; fp16, bf16, fp32; head dims 64, 80,
96, 128, 256; causal, banded, non-causal) and LayerNorm (forward and backward, widths up
to 16384). It is written to ``compile_table_sm90.{json,md}``.

Launches are modelled as the launchers make them: the last-dim strides equal 1 (Triton
specialises an int argument equal to 1 into a constant) and pointers and other strides
are 16-byte aligned / divisible by 16, as for contiguous (B, T, H, D) tensors.
Works with Triton 3.6 and 3.9 (``ASTSource`` with a name -> type signature).
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # minigpt_kernels lives in kernels/ (scripts/checkout.py)
os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
# A cache of its own, empty: every compile_s is a real compile, not a hit in ~/.triton/cache.
if "TRITON_CACHE_DIR" not in os.environ:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile-table-triton-cache-")
    atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

attn = importlib.import_module("minigpt_kernels.attention")  # the module; minigpt_kernels.attention is also the function
ln = importlib.import_module("minigpt_kernels.layer_norm")

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (64, 80, 96, 128, 256)
MODES = {"causal": (True, 0), "banded": (True, 256), "non-causal": (False, 0)}
LN_WIDTHS = (768, 1024, 1536, 2048, 2560, 4096, 5120, 12288, 16384)
# (dtype, head_dim) pairs that a GPT preset runs: GPT-2 and GPT-Neo use 64, the GPT-3
# presets 64, 96 (large), 128 (xl, 6.7b, 13b, 175b: 12288 / 96) and 80 (2.7b); LayerNorm
# widths are the presets' n_embd. Training runs in bf16 or fp16; fp32 is the CPU/test path.
PRESET_HEAD_DIMS = (64, 80, 96, 128)
PRESET_LN_WIDTHS = (768, 1024, 1280, 1536, 1600, 2048, 2560, 4096, 5120, 12288)


def ptxas_path() -> Path:
    """The ptxas Triton itself uses for sm_90 (Triton 3.9 ships two; the PTX version it emits
    follows the one it picks), else the wheel's bin/ptxas."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            return Path(get_ptxas(TARGET.arch).path)
        except TypeError:  # older Tritons: get_ptxas() takes no arch
            tool = get_ptxas()
            return Path(getattr(tool, "path", tool))
    except (ImportError, AttributeError):
        return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def _signature(fn, dtype: str, constexprs: dict, pointer_types: dict[str, str]) -> tuple[dict, dict]:
    # name -> type for every argument; constexprs (and ints equal to 1) as "constexpr".
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointer_types.get(name, "*" + dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith("stride_") or name.startswith("n_") or name in ("seq_len", "rows_per_program"):
            sig[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    return sig, attrs


def compile_one(fn, dtype: str, constexprs: dict, num_warps: int, num_stages: int,
                pointer_types: dict[str, str] | None = None) -> dict:
    """Compile ``fn`` for sm_90 and return registers, spills and shared memory."""
    sig, attrs = _signature(fn, dtype, constexprs, pointer_types or {})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    began = time.perf_counter()
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    compile_s = time.perf_counter() - began  # Triton's front end, its MLIR/LLVM passes and ptxas, on this CPU
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([str(ptxas_path()), "-v", "--gpu-name", "sm_90a", str(path), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spill.group(1)) if spill else 0,
        "spill_loads": int(spill.group(2)) if spill else 0,
        "shared_bytes": int(compiled.metadata.shared),
        "num_warps": num_warps, "num_stages": num_stages, "compile_s": round(compile_s, 2),
    }


def _strides_one(fn) -> dict:
    # Last-dim strides are 1 at every launch: Triton makes them compile-time constants.
    return {n: 1 for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")}


def attention_rows(quick: bool = False, dtypes=tuple(DTYPES), head_dims=HEAD_DIMS) -> list[dict]:
    rows = []
    f32 = {n: "*fp32" for n in ("LSE_ptr", "Delta_ptr")}
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for D in head_dims[:2] if quick else head_dims:
            tiles = attn.attention_tiles(D, dtype, interpreter=False)
            precision = attn._dot_precision(dtype)
            block_d = attn._block_d(D)
            for mode, (causal, window) in (list(MODES.items())[:2] if quick else MODES.items()):
                for kernel, fn, cfg in (
                    ("fwd", attn._attention_fwd_kernel, tiles.fwd),
                    ("bwd_dkdv", attn._attention_bwd_dkdv_kernel, tiles.bwd_dkdv),
                    ("bwd_dq", attn._attention_bwd_dq_kernel, tiles.bwd_dq),
                ):
                    consts = dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                  CAUSAL=causal, WINDOW=window, DOT_PRECISION=precision, **_strides_one(fn))
                    row = {"kernel": f"attention_{kernel}", "dtype": dtype_name, "head_dim": D, "mode": mode,
                           "tile": f"{cfg.block_m}x{cfg.block_n}", "preset": D in PRESET_HEAD_DIMS and dtype_name != "fp32"}
                    row.update(_safe(compile_one, fn, dtype_name, consts, cfg.num_warps, cfg.num_stages, f32))
                    rows.append(row)
                    print(_line(row), flush=True)
            pre = tiles.bwd_dq
            consts = dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre.block_m,
                          **_strides_one(attn._attention_bwd_preprocess_kernel))
            row = {"kernel": "attention_bwd_preprocess", "dtype": dtype_name, "head_dim": D, "mode": "any",
                   "tile": f"{pre.block_m}", "preset": D in PRESET_HEAD_DIMS and dtype_name != "fp32"}
            row.update(_safe(compile_one, attn._attention_bwd_preprocess_kernel, dtype_name, consts, pre.num_warps, 1, f32))
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def layer_norm_rows(quick: bool = False) -> list[dict]:
    rows = []
    f32 = {n: "*fp32" for n in ("Mean_ptr", "Rstd_ptr", "dW_partial_ptr", "dB_partial_ptr")}
    widths = sorted(set(LN_WIDTHS) | set(PRESET_LN_WIDTHS))
    for dtype_name, dtype in DTYPES.items():
        for n in widths[:2] if quick else widths:
            if n > ln.max_width(dtype):
                continue
            block_n = triton.next_power_of_2(n)
            block_rows = min(max(4096 // block_n, 1), 16)
            wide = n > ln.WIDE_ROW
            bwd_kernel, bwd_n, bwd_warps = ln.bwd_dx_launch(n)
            cases = [
                ("fwd", ln._layer_norm_fwd_kernel,
                 dict(HAS_BIAS=True, BLOCK_ROWS=block_rows, BLOCK_N=block_n, stride_xn=1),
                 ln._num_warps(block_rows * block_n), f"{block_rows}x{block_n}"),
                ("bwd_dx_wide" if wide else "bwd_dx", bwd_kernel,
                 dict(HAS_BIAS=True, BLOCK_N=bwd_n, stride_xn=1, stride_dyn=1), bwd_warps, f"1x{bwd_n}"),
            ]
            for kernel, fn, consts, warps, tile in cases:
                row = {"kernel": f"layer_norm_{kernel}", "dtype": dtype_name, "head_dim": None, "mode": f"N={n}",
                       "tile": tile, "preset": n in PRESET_LN_WIDTHS}
                row.update(_safe(compile_one, fn, dtype_name, consts, warps, 1, f32))
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _safe(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - a failed compile is a row of the table
        return {"error": f"{type(err).__name__}: {err}"[:300]}


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['kernel']:26s} {row['dtype']} D={row['head_dim']} {row['mode']:10s} ERROR {row['error']}"
    return (f"{row['kernel']:26s} {row['dtype']} D={row['head_dim']} {row['mode']:10s} tile {row['tile']:8s} "
            f"regs {row['registers']:3d} spills {row['spill_stores']:3d}/{row['spill_loads']:3d} "
            f"smem {row['shared_bytes']:6d}")


def to_markdown(rows: list[dict], env: dict) -> str:
    lines = ["# sm_90 compile table (registers, spills, shared memory)", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "`preset`: a configuration a GPT preset uses on the GPU (16-bit attention at head dims 64/80/96/128, "
             "LayerNorm at the presets' widths); tests/test_compile_table.py fails on a spill there.", "",
             "| kernel | dtype | head_dim | mode | tile | warps | stages | registers | spill stores | spill loads | "
             "shared bytes | compile s | preset |",
             "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['dtype']} | {r['head_dim']} | {r['mode']} | {r['tile']} | | | "
                         f"error: {r['error'][:80]} | | | | | {r['preset']} |")
            continue
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['head_dim'] or ''} | {r['mode']} | {r['tile']} | "
                     f"{r['num_warps']} | {r['num_stages']} | {r['registers']} | {r['spill_stores']} | "
                     f"{r['spill_loads']} | {r['shared_bytes']} | {r.get('compile_s', '')} | "
                     f"{'yes' if r['preset'] else ''} |")
    spills = [r for r in rows if r.get("spill_stores")]
    lines += ["", f"Configurations that spill: {len(spills)} of {len(rows)}"
              f" ({sum(1 for r in spills if r['preset'])} at preset configurations)."]
    timed = [r["compile_s"] for r in rows if "compile_s" in r]
    if timed:
        attention = [r["compile_s"] for r in rows if "compile_s" in r and r["kernel"].startswith("attention")]
        lines += ["", f"Compile time on this CPU (`triton.compile` for sm_90, one process): {sum(timed):.0f} s for "
                  f"{len(timed)} kernels, median {sorted(timed)[len(timed) // 2]:.2f} s; attention kernels "
                  f"{sum(attention):.0f} s for {len(attention)}, longest {max(attention, default=0):.2f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for NAME.json and NAME.md")
    parser.add_argument("--name", default="compile_table_sm90",
                        help="file name without suffix (default: %(default)s; e.g. compile_table_sm90_triton36 for "
                             "the GPU machine's Triton 3.6)")
    parser.add_argument("--quick", action="store_true", help="a few configurations only (a smoke run)")
    parser.add_argument("--only", choices=["attention", "layer_norm"], default=None)
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="attention dtypes, comma-separated")
    parser.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)), help="attention head dims")
    parser.add_argument("--update", action="store_true",
                        help="replace the matching rows of an existing table in --out instead of writing a new one")
    args = parser.parse_args(argv)
    if not ptxas_path().exists():
        raise SystemExit(f"ptxas not found at {ptxas_path()}; it ships in Triton's wheel for NVIDIA")
    rows = []
    if args.only in (None, "attention"):
        rows += attention_rows(args.quick, tuple(args.dtypes.split(",")),
                               tuple(int(d) for d in args.head_dims.split(",")))
    if args.only in (None, "layer_norm"):
        rows += layer_norm_rows(args.quick)
    env = {"triton": triton.__version__, "torch": torch.__version__, "target": "sm_90 (cuda, 90, warp 32)"}
    if args.out is not None and args.update and (args.out / f"{args.name}.json").exists():
        def key(r):
            return r["kernel"].replace("_wide", ""), r["dtype"], r["head_dim"], r["mode"]

        new = {key(r): r for r in rows}
        old = json.loads((args.out / f"{args.name}.json").read_text())["rows"]
        rows = [new.pop(key(r), r) for r in old] + list(new.values())
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
        (args.out / f"{args.name}.md").write_text(to_markdown(rows, env))
    return rows


if __name__ == "__main__":
    main()
