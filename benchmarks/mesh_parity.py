"""How far each device-mesh layout's training losses are from one process's, on CPU (gloo).

The tests in tests/train/test_mesh.py assert that three layouts (2x2, tp=2, dp_shard=2) and
a resume of a 2x2 sharded checkpoint on 4x1 and 1x2 give one process's losses to 1e-5;
this trains the same tiny model (GPT-Neo's shape: vocabulary 65, block 32, 2 layers, 4
heads, n_embd 32, a dense and a banded layer, dropout 0; AdamW, 10 updates, global batch 8,
fp32) on those layouts and on two the tests do not cover yet (HSDP: dp_replicate=2 x
dp_shard=2, and 2x2 with activation checkpointing), each through the CLI under torchrun
(`torchrun --standalone --nproc_per_node=N -m minigpt train --config cfg.json`, gloo), and
records per layout the largest |loss - one process's loss| over the 10 updates, the
wall-clock time of the torchrun job, and the files of its last (sharded) checkpoint. One
process trains from `init_by_name` weights (`tests.train.common.
train_as_pretrain_from_init_by_name`), the start every mesh run has.

A layout that fails is recorded with its exit status and the last lines of its stderr.
Benchmarks never assert.

    python -m benchmarks.mesh_parity          # writes results/mesh_parity_cpu.{md,json}
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import REPO_ROOT, git_commit

RESULTS = REPO_ROOT / "benchmarks" / "results"
SHAKESPEARE = Path("/work/shared/data/tinyshakespeare/input.txt")

MODEL = {"vocab_size": 65, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32, "dropout": 0.0,
         "attention_pattern": ["dense", "banded"], "attention_window": 8, "attention_scale": 1.0,
         "qkv_bias": False}
"""tests/train/test_mesh.py's MODEL."""
GLOBAL_BATCH = 8
STEPS = 10
LAYOUTS = [  # (name, processes, TrainConfig mesh fields)
    ("2x2 (dp_shard=2, tp=2)", 4, {"dp_shard": 2, "tp": 2}),
    ("tp=2", 2, {"tp": 2}),
    ("dp_shard=2", 2, {"dp_shard": 2}),
    ("HSDP (dp_replicate=2, dp_shard=2)", 4, {"dp_replicate": 2, "dp_shard": 2}),
    ("2x2 + activation checkpointing", 4, {"dp_shard": 2, "tp": 2, "activation_checkpointing": True}),
]
RESUMES = [("4x1 (dp_shard=4)", 4, {"dp_shard": 4}), ("1x2 (tp=2)", 2, {"tp": 2})]
"""Meshes that resume the 2x2 run's sharded checkpoint of step 5."""


def _config(data: Path, out_dir: Path, dp: int, max_steps: int = STEPS, **train) -> dict:
    """tests/train/test_mesh.py's `_config`: the global batch split over the `dp` data-parallel ranks."""
    return {
        "model": MODEL,
        "train": {"out_dir": str(out_dir), "max_steps": max_steps, "batch_size": GLOBAL_BATCH // dp,
                  "optimizer": "adamw", "lr": 3e-3, "lr_decay_steps": 10, "warmup_steps": 1, "eval_interval": 5,
                  "eval_steps": 1, "log_interval": 1, "checkpoint_interval": 5, "device": "cpu", "progress": False,
                  **train},
        "data": {"path": str(data)},
        "sample": {"tokens": 0, "seed": 0},
    }


def _dp(nproc: int, mesh: dict) -> int:
    return nproc // mesh.get("tp", 1)


def _losses(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(x) for x in path.read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def _torchrun(work: Path, name: str, nproc: int, config: dict, *extra: str) -> dict:
    """Run one torchrun job; its exit status, wall time, the mesh line it logged and, on failure,
    the last lines of its stderr."""
    path = work / f"{name}.json"
    path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "minigpt", "train", "--config", str(path), *extra]
    began = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
        rc, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired as e:
        rc, stderr = "timeout (600 s)", (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) \
            else (e.stderr or "")
    seconds = time.perf_counter() - began
    mesh_line = next((line[line.index("mesh "):] for line in stderr.splitlines() if "mesh dp_replicate=" in line), None)
    result = {"command": " ".join(["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "minigpt", "train",
                                   "--config", f"{name}.json", *extra]),
              "returncode": rc, "seconds": round(seconds, 1), "mesh_line": mesh_line}
    if rc != 0:
        result["error_tail"] = _error_tail(stderr)
    return result


def _error_tail(stderr: str, lines: int = 25) -> str:
    """The last lines of the first rank's traceback (torchrun repeats it per rank), else of stderr."""
    kept = [line for line in stderr.splitlines() if "Warning" not in line and "warnings.warn" not in line]
    text = "\n".join(kept)
    first = text.find("Traceback (most recent call last)")
    if first >= 0:
        end = text.find("Traceback (most recent call last)", first + 1)
        block = text[first:end if end > 0 else None].splitlines()
        return "\n".join(block[-lines:])
    return "\n".join(kept[-lines:])


def _checkpoint_files(run_dir: Path) -> dict:
    """The latest checkpoint's folder name and its files (path relative to it, bytes)."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        return {}
    folder = latest.resolve()
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    return {"folder": folder.name, "files": files}


def _max_diff(losses: list[float], reference: list[float]) -> float | None:
    if not losses or len(losses) != len(reference):
        return None
    return max(abs(a - b) for a, b in zip(losses, reference))


def run(work: Path) -> dict:
    from minigpt.pretrain import PrepareConfig, prepare
    from tests.train.common import train_as_pretrain_from_init_by_name

    data = work / "data"
    prepare(PrepareConfig(inputs=(str(SHAKESPEARE),), out_dir=str(data), tokenizer="char", progress=False))

    single = work / "single"
    (work / "single.json").write_text(json.dumps(_config(data, single, dp=1)))
    torch.set_num_threads(1)  # as the tests do: a tiny model on a shared 2-core machine
    began = time.perf_counter()
    train_as_pretrain_from_init_by_name(work / "single.json")
    reference = {"seconds": round(time.perf_counter() - began, 1), "losses": _losses(single)}
    print(f"one process: {reference['seconds']} s, losses {reference['losses']}", file=sys.stderr, flush=True)

    layouts = []
    for name, nproc, mesh in LAYOUTS:
        slug = "run-" + "".join(c if c.isalnum() else "_" for c in name)
        out = work / slug
        config = _config(data, out, dp=_dp(nproc, mesh), checkpoint_format="sharded", **mesh)
        result = _torchrun(work, slug, nproc, config)
        losses = _losses(out)
        row = {"layout": name, "processes": nproc, "mesh": mesh, **result, "losses": losses,
               "max_abs_diff": _max_diff(losses, reference["losses"]), "checkpoint": _checkpoint_files(out)}
        layouts.append(row)
        print(f"{name}: rc {row['returncode']}, {row['seconds']} s, max |dloss| {row['max_abs_diff']}",
              file=sys.stderr, flush=True)

    first = work / "first"
    first_mesh = {"dp_shard": 2, "tp": 2}
    saved = _torchrun(work, "first", 4, _config(data, first, dp=2, max_steps=5, checkpoint_format="sharded",
                                                **first_mesh))
    saved.update(losses=_losses(first), checkpoint=_checkpoint_files(first),
                 max_abs_diff=_max_diff(_losses(first), reference["losses"][:5]))
    resumes = []
    for name, nproc, mesh in RESUMES:
        slug = "resume-" + "".join(c if c.isalnum() else "_" for c in name)
        out = work / slug
        if (first / "checkpoints").exists():
            shutil.copytree(first, out)
        config = _config(data, out, dp=_dp(nproc, mesh), checkpoint_format="sharded", **mesh)
        result = _torchrun(work, slug, nproc, config, "--resume")
        losses = _losses(out)[5:]
        row = {"layout": name, "processes": nproc, "mesh": mesh, **result, "losses_6_to_10": losses,
               "max_abs_diff": _max_diff(losses, reference["losses"][5:])}
        resumes.append(row)
        print(f"resume on {name}: rc {row['returncode']}, max |dloss| steps 6-10 {row['max_abs_diff']}",
              file=sys.stderr, flush=True)
    return {"reference": reference, "layouts": layouts, "saved_2x2_step5": saved, "resumes": resumes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "mesh_parity_cpu"), help="path without suffix")
    parser.add_argument("--keep", help="a folder to keep the runs in (default: a temporary one, removed)")
    args = parser.parse_args()
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "platform": platform.platform(), "commit": git_commit(),
           "command": "python -m benchmarks.mesh_parity",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        results = run(Path(args.keep))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = run(Path(tmp))
    Path(args.out + ".json").write_text(json.dumps({"env": env, **results}, indent=2) + "\n")
    Path(args.out + ".md").write_text(_markdown(results, env))
    print(f"wrote {args.out}.md and .json")


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2e}"


def _files(checkpoint: dict) -> str:
    files = checkpoint.get("files", {})
    if not files:
        return "none"
    sharded = {k: v for k, v in files.items() if k.startswith("sharded/")}
    shards = [k for k in sharded if k.endswith(".distcp")]
    sizes = " + ".join(f"{sharded[k] / 1024:.0f}" for k in shards)
    text = f"`{checkpoint['folder']}`: {len(shards)} x `sharded/__<rank>_0.distcp` ({sizes} KiB)"
    rest = [k for k in files if k not in shards]
    return text + ", " + ", ".join(f"`{k}`" for k in rest)


def _markdown(results: dict, env: dict) -> str:
    ref = results["reference"]
    lines = [
        "# Mesh parity, CPU (gloo)",
        "",
        "`python -m benchmarks.mesh_parity`: the tests' tiny model (tests/train/test_mesh.py: vocabulary 65, "
        "block 32, 2 layers, 4 heads, n_embd 32, dense + banded, GPT-Neo's shape, dropout 0; AdamW, 10 updates, "
        "global batch 8, fp32) trained by `torchrun --standalone --nproc_per_node=N -m minigpt train --config "
        "cfg.json` on each layout, every rank filling its shards by `init_by_name`, against one process "
        "trained from the same `init_by_name` weights (`tests.train.common.train_as_pretrain_from_init_by_name`). "
        "Every layout saves sharded checkpoints (`checkpoint_format='sharded'`) at steps 5 and 10; the files "
        "are those of step 10's. Wall time is the whole torchrun job (start-up, two evaluations, two "
        "checkpoints), on a shared 2-core machine: only a rough guide. The tests' tolerance is rtol = atol = "
        "1e-5; a float32 loss near 4 has a spacing (ulp) of 2.4e-7 below 4 and 4.8e-7 above, so 4.77e-07 is "
        "one or two ulps (the per-step differences are in the JSON).",
        "",
        f"torch {env['torch']}, Python {env['python']}, {env['platform']}, {env['cpus']} CPUs, "
        f"commit {env['commit']}, {env['date']}.",
        "",
        f"One process: {ref['seconds']} s, losses " + ", ".join(f"{x:.4f}" for x in ref["losses"]) + ".",
        "",
        "| layout | processes | exit | max \\|Δloss\\| (10 steps) | wall (s) | last checkpoint's files |",
        "| --- | ---: | --- | ---: | ---: | --- |",
    ]
    for r in results["layouts"]:
        lines.append(f"| {r['layout']} | {r['processes']} | {r['returncode']} | {_fmt(r['max_abs_diff'])} | "
                     f"{r['seconds']} | {_files(r['checkpoint'])} |")
    s = results["saved_2x2_step5"]
    lines += [
        "",
        f"Resume: the 2x2 run stopped after 5 updates (exit {s['returncode']}, max |Δloss| of steps 1-5 "
        f"{_fmt(s['max_abs_diff'])}, checkpoint {_files(s['checkpoint'])}), its run folder copied and resumed "
        "with `--resume` on another mesh for updates 6-10, against one process's updates 6-10:",
        "",
        "| resumed on | processes | exit | max \\|Δloss\\| (steps 6-10) | wall (s) |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for r in results["resumes"]:
        lines.append(f"| {r['layout']} | {r['processes']} | {r['returncode']} | {_fmt(r['max_abs_diff'])} | "
                     f"{r['seconds']} |")
    failures = [r for r in results["layouts"] + [s] + results["resumes"] if r["returncode"] != 0]
    for r in failures:
        lines += ["", f"**{r.get('layout', '2x2, 5 steps')} failed** (exit {r['returncode']}): `{r['command']}`, "
                  "the end of its traceback:", "", "```", r.get("error_tail", ""), "```"]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
