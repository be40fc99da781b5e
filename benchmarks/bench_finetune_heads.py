"""Head vs classification as completion on SST-2, from scratch, same budget: the README's
Fine-tuning table ("Head vs classification as completion").

Four runs of `python -m minigpt finetune classify` on the shared SST-2 copy (6,961 training
rows, the 960 validation rows), each from a fresh one-layer GPT saved beforehand with seed 0
(n_embd 32, 2 heads, block_size 64, GPT-2's 50,257 tokens), texts cut to 48 tokens, 300
updates of 32 rows, lr 3e-3 with 20 warm-up updates and a cosine to 3e-4, no weight decay,
evaluated every 100 updates and exported from the best checkpoint by validation accuracy:

    head, tied          a classification head; the base model's LM head tied to its embedding
    head, untied        the same with an untied LM head (a classifier never runs it)
    as completion       --as-completion, untied LM head: " positive"/" negative" after
                        "Review: {text}\\nSentiment:", scored by label log-likelihood
    as completion, tied the same with the tied LM head

These are the settings the README paragraph states; the other choices (2 heads, 20 warm-up
updates, no weight decay, seed 0) are those of the from-scratch SST-2 test in
tests/train/test_finetune.py, since the run behind the first table was not recorded.

Records each run's validation accuracy, macro F1 and (as completion) greedy exact match from
OUT/eval/metrics.json, the command's wall time, the training loop's own wall time, and the
machine's 1-minute load average sampled every few seconds while it ran (`os.getloadavg()`):
on a shared machine the wall times mean little without it. Never asserts.

    python benchmarks/bench_finetune_heads.py              # 1 thread, a few minutes
    # writes benchmarks/results/finetune_heads.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, environment, markdown_table  # noqa: E402
from scripts.checkout import child_env  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(os.environ.get("MINIGPT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()

MODEL = dict(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=32)
TRAIN = ["--max_steps=300", "--batch_size=32", "--lr=3e-3", "--min_lr=3e-4", "--warmup_steps=20",
         "--weight_decay=0.0", "--eval_interval=100", "--progress=false"]
CONFIGS = [  # (name, tied LM head, taught as completion)
    ("classification head, tied embedding", True, False),
    ("classification head", False, False),
    ("as completion, label log-likelihood", False, True),
    ("as completion, tied embedding", True, True),
]


def save_base(folder: Path, tied: bool) -> Path:
    """A fresh random GPT of MODEL's shape (seed 0), saved as a model folder `--init` reads."""
    import torch

    from minigpt import GPT, GPTConfig

    torch.manual_seed(0)
    GPT(GPTConfig(**MODEL, tie_embeddings=tied)).save_pretrained(folder)
    return folder


def run_sampling_load(command: list[str], env: dict, every_s: float = 5.0) -> tuple[int, float, list[float]]:
    """Run `command`; return (exit status, wall seconds, 1-minute load averages sampled while it ran)."""
    began = time.perf_counter()
    child = subprocess.Popen(command, env=env)
    loads = [os.getloadavg()[0]]
    while True:
        try:
            child.wait(timeout=every_s)
            break
        except subprocess.TimeoutExpired:
            loads.append(os.getloadavg()[0])
    return child.returncode, time.perf_counter() - began, loads


def run_config(name: str, tied: bool, as_completion: bool, work: Path, threads: int, data: Path) -> dict:
    base = save_base(work / ("base-tied" if tied else "base-untied"), tied)
    out = work / name.replace(" ", "-").replace(",", "")
    command = [sys.executable, "-m", "minigpt", "finetune", "classify", "--init", str(base),
               "--train-file", str(data / "train.csv"), "--val-file", str(data / "validation.csv"),
               "--out", str(out), "--max-length", "48", f"--threads={threads}", *TRAIN]
    if as_completion:
        command.append("--as-completion")
    env = child_env()
    print("$", " ".join(command[1:]), flush=True)
    status, wall, loads = run_sampling_load(command, env)
    row = {"model": name, "tied": tied, "as_completion": as_completion, "exit": status, "wall_s": round(wall, 1),
           "load_min": min(loads), "load_mean": round(statistics.fmean(loads), 2), "load_max": max(loads)}
    if status != 0:
        return row
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    row.update(accuracy=metrics["accuracy"], macro_f1=metrics["macro_f1"], exact_match=metrics.get("exact_match"),
               majority_baseline=metrics["majority_baseline"], n=metrics["n"], best_step=metrics.get("best_step"),
               train_wall_s=round(max(e.get("wall_s", 0.0) for e in evals), 1),
               val_accuracy_by_step={e["step"]: e["val_accuracy"] for e in evals if "val_accuracy" in e})
    return row


def to_markdown(result: dict) -> str:
    env = result["environment"]
    rows = [{**r, "accuracy": f"{r['accuracy']:.1%}" if "accuracy" in r else f"exit {r['exit']}",
             "macro F1": f"{r['macro_f1']:.3f}" if "macro_f1" in r else "",
             "greedy exact match": f"{r['exact_match']:.1%}" if r.get("exact_match") is not None else "-",
             "wall s": f"{r['wall_s']:.0f}", "training s": r.get("train_wall_s"),
             "load (1 min) while running": f"{r['load_min']:.1f}-{r['load_max']:.1f} (mean {r['load_mean']:.1f})"}
            for r in result["runs"]]
    first = next((r for r in result["runs"] if "n" in r), {})
    return "\n".join([
        "# Head vs classification as completion (SST-2, from scratch, same budget)", "",
        f"{result['machine']}, {result['threads']} thread(s); torch {env['torch']}; commit {env['commit']}; "
        f"{env['date']}.", "",
        f"Validation rows: {first.get('n')}, majority baseline {first.get('majority_baseline', 0):.1%}. "
        f"Model {result['model']}, texts cut to 48 tokens; training {' '.join(result['train'])}.", "",
        markdown_table(rows, ["model", "accuracy", "macro F1", "greedy exact match", "wall s", "training s",
                              "load (1 min) while running"]), "",
        "wall s: the whole `python -m minigpt finetune classify` command (start-up, data, training, evaluations, "
        "export, final report); training s: the training loop's own clock (metrics.jsonl).", "",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA / "sentiment", help="folder with SST-2's train.csv, validation.csv")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="finetune_heads", help="results file stem")
    args = p.parse_args()
    from minigpt.device import describe_cpu

    result = {"machine": describe_cpu(),
              "threads": args.threads, "model": MODEL, "train": TRAIN, "environment": environment(),
              "load_before": os.getloadavg(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_finetune_heads_") as work:
        for name, tied, as_completion in CONFIGS:
            result["runs"].append(run_config(name, tied, as_completion, Path(work), args.threads, args.data))
            print(json.dumps(result["runs"][-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
