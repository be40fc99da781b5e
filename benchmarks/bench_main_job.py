"""The README's main job against nanoGPT's own code, side by side on one machine.

Each side is one whole command in a fresh process, timed from launch to exit:

- minigpt: `python -m minigpt train --out-dir <tmp>` (the README's main job: data preparation
  of the shipped tiny Shakespeare, training, evaluations, checkpoint, the closing sample);
- nanoGPT: its `train.py` with its documented CPU recipe for tiny Shakespeare (the README's
  "I only have a macbook" command, with eval_iters=20 as issue 31 ran it), from a checkout
  given by --nanogpt whose `data/shakespeare_char/prepare.py` has been run on the same
  input.txt (its split: the last 10% of the text is validation, as minigpt's).

They alternate for --rounds rounds at each thread count (OMP_NUM_THREADS, which both torch
processes read at start-up: neither command gains a flag). Reported per round and as
medians: wall seconds, the final validation loss, the ratio of wall times, and the wall
time after launch at which each first reached nanoGPT's final loss (from when each
evaluation's log line arrived, start-up included for both).

    python benchmarks/bench_main_job.py --nanogpt /path/to/nanoGPT

Writes benchmarks/results/main_job_vs_nanogpt.json and .md. Never asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
                "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
EVAL_LINE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
MINIGPT_EVAL_LINE = re.compile(r"step (\d+): val_loss (\S+)")


def _timed(cmd: list[str], cwd: Path, threads: int) -> tuple[float, list[tuple[float, str]]]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    began = time.perf_counter()
    lines, stamps = [], []
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            stamps.append(time.perf_counter() - began)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{''.join(lines[-40:])}")
    return wall, list(zip(stamps, lines))


def run_minigpt(threads: int) -> dict:
    """Its evaluations timed, as nanoGPT's, by when their log line arrived after launch."""
    with tempfile.TemporaryDirectory() as out:
        wall, lines = _timed([sys.executable, "-m", "minigpt", "train", "--out-dir", out], REPO, threads)
        records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    logged = {int(m.group(1)): stamp for stamp, line in lines if (m := MINIGPT_EVAL_LINE.search(line))}
    evaluations = [r for r in records if r["kind"] == "eval"]
    if missing := [r["step"] for r in evaluations if r["step"] not in logged]:
        raise RuntimeError(f"minigpt's output has no 'step N: val_loss' line for the evaluations at steps {missing}; "
                           f"the bench times them by those lines")
    evals = [(logged[r["step"]], r["val_loss"]) for r in evaluations]
    return {"wall_s": wall, "val_loss": evals[-1][1], "evals": evals}


def run_nanogpt(folder: Path, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        wall, lines = _timed([sys.executable, "train.py", *NANOGPT_ARGS, f"--out_dir={out}"], folder, threads)
    evals = [(stamp, float(m.group(3))) for stamp, line in lines if (m := EVAL_LINE.search(line))]
    return {"wall_s": wall, "val_loss": evals[-1][1], "evals": evals}


def _first_time_at(evals: list, loss: float) -> float | None:
    return next((t for t, v in evals if v <= loss), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout with shakespeare_char prepared")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    from minigpt.device import describe_cpu  # now, not after the rounds: a missing minigpt fails at once

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    nano_commit = subprocess.run(["git", "-C", str(args.nanogpt), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip() or "unknown"
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        rounds = []
        for _ in range(args.rounds):
            mini, nano = run_minigpt(threads), run_nanogpt(args.nanogpt, threads)
            rounds.append({"minigpt": mini, "nanogpt": nano})
            print(json.dumps({"threads": threads, "minigpt_wall_s": round(mini["wall_s"], 1),
                              "minigpt_val": mini["val_loss"], "nanogpt_wall_s": round(nano["wall_s"], 1),
                              "nanogpt_val": nano["val_loss"]}), flush=True)
        ratio = [r["minigpt"]["wall_s"] / r["nanogpt"]["wall_s"] for r in rounds]
        reach = [(_first_time_at(r["minigpt"]["evals"], r["nanogpt"]["val_loss"]) or float("nan"))
                 / r["nanogpt"]["wall_s"] for r in rounds]
        rows.append({
            "threads": threads,
            "minigpt_wall_s": round(statistics.median(r["minigpt"]["wall_s"] for r in rounds), 1),
            "nanogpt_wall_s": round(statistics.median(r["nanogpt"]["wall_s"] for r in rounds), 1),
            "minigpt_val_loss": round(statistics.median(r["minigpt"]["val_loss"] for r in rounds), 4),
            "nanogpt_val_loss": round(statistics.median(r["nanogpt"]["val_loss"] for r in rounds), 4),
            "wall_ratio": round(statistics.median(ratio), 2),
            "wall_ratio_per_round": [round(x, 2) for x in ratio],
            "reaches_nanogpt_final_at": round(statistics.median(reach), 2),
            "rounds": rounds,
        })
    meta = {"machine": describe_cpu(),
            "date": time.strftime("%Y-%m-%d"), "commit": commit, "nanogpt_commit": nano_commit,
            "nanogpt_command": "python train.py " + " ".join(NANOGPT_ARGS),
            "minigpt_command": "python -m minigpt train --out-dir <tmp>"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "main_job_vs_nanogpt.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# The main job against nanoGPT's own code ({meta['date']}, commit {commit}, nanoGPT {nano_commit})", "",
             f"{meta['machine']}; each whole command in a fresh process, alternating, {args.rounds} rounds per thread "
             f"count (OMP_NUM_THREADS); medians. nanoGPT: `{meta['nanogpt_command']}`. minigpt: "
             f"`{meta['minigpt_command']}`. `python benchmarks/bench_main_job.py --nanogpt <checkout>`.", "",
             "| threads | minigpt wall s | val loss | nanoGPT wall s | val loss | minigpt / nanoGPT time | "
             "minigpt reaches nanoGPT's final loss at |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['minigpt_wall_s']} | {r['minigpt_val_loss']} | {r['nanogpt_wall_s']} | "
                     f"{r['nanogpt_val_loss']} | {r['wall_ratio']}x (rounds {r['wall_ratio_per_round']}) | "
                     f"{r['reaches_nanogpt_final_at']}x of nanoGPT's time |")
    (args.out / "main_job_vs_nanogpt.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
