"""Peak memory of a GPT-2-medium-shaped forward+backward on CPU, with and without activation
checkpointing (TrainConfig.activation_checkpointing, applied by minigpt.train.parallel).

Each mode runs in a fresh subprocess, so its peak resident set (`resource.getrusage`
ru_maxrss) is its own. Gradients are allocated before the measured step, so the peak
above the resident set just before the forward is the activations (and transients).

    python -m benchmarks.bench_activation_checkpointing [--seq-len 512] [--batch 1]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT

RESULTS = REPO_ROOT / "benchmarks" / "results"


def _rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(checkpointing: bool, batch: int, seq_len: int) -> dict:
    """One forward+backward in this process; call in a fresh one (see `main`)."""
    import torch

    from minigpt import GPT, GPTConfig
    from minigpt.train.config import TrainConfig
    from minigpt.train.parallel import parallelize

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304, block_size=seq_len, n_layer=24, n_head=16, n_embd=1024))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # backward accumulates here: no new allocation
    idx = torch.randint(0, 50304, (batch, seq_len))
    config = TrainConfig(out_dir="unused", max_steps=1, batch_size=batch, activation_checkpointing=checkpointing)
    before = _rss_mib()
    began = time.perf_counter()
    with parallelize(model, config, "none", torch.device("cpu")) as module:
        module(idx, idx).loss.backward()
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"activation_checkpointing": checkpointing, "peak_rss_mib": round(peak, 1),
            "before_forward_mib": round(before, 1), "activations_mib": round(peak - before, 1),
            "seconds": round(seconds, 1), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one == "on", args.batch, args.seq_len)))
        return
    rows = []
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_activation_checkpointing", "--one", mode,
                              "--batch", str(args.batch), "--seq-len", str(args.seq_len)],
                             cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    off, on = rows
    shape = f"GPT-2-medium shape (24 layers, n_embd 1024, 16 heads), B={args.batch}, T={args.seq_len}, fp32, CPU"
    summary = {"shape": shape, "rows": rows,
               "activations_saved": round(1 - on["activations_mib"] / off["activations_mib"], 3),
               "peak_saved": round(1 - on["peak_rss_mib"] / off["peak_rss_mib"], 3)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "activation_checkpointing_cpu.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["# Activation checkpointing: peak memory of one forward+backward\n", f"{shape}; each mode in a fresh process.\n",
             "| activation checkpointing | peak RSS (MiB) | RSS before forward (MiB) | activations (MiB) | seconds |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['activation_checkpointing']} | {r['peak_rss_mib']} | {r['before_forward_mib']} | "
              f"{r['activations_mib']} | {r['seconds']} |" for r in rows]
    lines.append(f"\nActivation memory {100 * summary['activations_saved']:.0f}% less, "
                 f"whole-process peak {100 * summary['peak_saved']:.0f}% less.")
    (RESULTS / "activation_checkpointing_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
