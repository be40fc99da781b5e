"""Evaluation throughput: multiple-choice items/s with the context's KV cache shared by its
choices (`minigpt.evaluation.scoring`, the default) against the straightforward way that
lm-evaluation-harness uses, one sequence per context + choice (`use_cache=False`).

Shape of the job (issue 19): 4 choices per item, 1-shot contexts of ~150 tokens, choices of
~15-25 tokens (HellaSwag's endings are about that long), a GPT-2-shaped 6-layer model
(n_embd 768, 12 heads, vocab 50257) with random weights, float32 on the CPU. Both methods
get the same batches (`--batch-size` items per forward) and read the LM head only at the
scored positions, so the difference is the context encoded once instead of four times.
Rounds alternate the two methods and the median is reported; the largest difference of
any per-token log-probability between them is recorded as the check that the same numbers
are computed.

    python benchmarks/bench_eval.py            # writes benchmarks/results/bench_eval_cpu.{json,md}

Never asserts (house rule: benchmarks measure and report).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt import GPT, GPTConfig  # noqa: E402
from minigpt.device import describe_cpu  # noqa: E402
from minigpt.evaluation.scoring import score_continuations  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def make_requests(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [([rng.randrange(50257) for _ in range(rng.randint(140, 160))],
             [[rng.randrange(50257) for _ in range(rng.randint(15, 25))] for _ in range(4)]) for _ in range(n)]


def measure(model, requests, batch_size: int, rounds: int, device: str) -> dict:
    """Alternate the two methods over rounds; items/s from the median round of each."""
    score_continuations(model, requests[:batch_size], batch_size=batch_size)  # warm-up
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    outputs = {}
    load_before = os.getloadavg()
    for r in range(rounds):
        for name in (("cached", "uncached") if r % 2 == 0 else ("uncached", "cached")):
            start = time.perf_counter()
            outputs[name] = score_continuations(model, requests, batch_size=batch_size, use_cache=name == "cached")
            if device != "cpu":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    diff = max(abs(a - b) for ra, rb in zip(outputs["cached"], outputs["uncached"]) for sa, sb in zip(ra, rb)
               for a, b in zip(sa.logprobs, sb.logprobs))
    same = sum(max(range(4), key=lambda i: ra[i].total) == max(range(4), key=lambda i: rb[i].total)
               for ra, rb in zip(outputs["cached"], outputs["uncached"]))
    items_s = {k: len(requests) / statistics.median(v) for k, v in times.items()}
    return {"threads": torch.get_num_threads(), "seconds_per_round": times, "items_per_s_median": items_s,
            "speedup": items_s["cached"] / items_s["uncached"], "max_abs_logprob_difference": diff,
            "same_prediction": f"{same}/{len(requests)}", "load_average_before": load_before,
            "load_average_after": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="2,1", help="torch intra-op thread counts to measure, e.g. 2,1")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, block_size=1024, n_layer=6, n_head=12, n_embd=768)
    model = GPT(config).to(args.device).eval()
    requests = make_requests(args.items)
    runs = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        runs.append(measure(model, requests, args.batch_size, args.rounds, args.device))
    result = {
        "job": {"items": args.items, "choices": 4, "context_tokens": "140-160", "choice_tokens": "15-25",
                "batch_size": args.batch_size, "rounds": args.rounds, "model": "6 layers, n_embd 768, 12 heads, "
                "vocab 50257, random weights, float32"},
        "runs": runs,
        "environment": {"device": args.device, "torch": torch.__version__, "cpu_count": os.cpu_count(),
                        "python": platform.python_version(), "machine": describe_cpu(),
                        "note": "shared 2-core VM; other engineers' jobs were running (see the load averages)"},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_eval_{args.device}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# bench_eval ({args.device})", "",
          f"{args.items} items of 4 choices, 1-shot contexts of 140-160 tokens, choices of 15-25 tokens, "
          f"GPT-2-shaped 6-layer model (random weights, float32), batch {args.batch_size} items; items/s from the "
          f"median of {args.rounds} rounds alternating the two methods. torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, a shared machine: other engineers' jobs were running (load averages below).", "",
          "| threads | uncached items/s | cached items/s | speedup | seconds per round (uncached; cached) | "
          "max logprob diff | same prediction | load avg before / after |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        rounds = "; ".join(", ".join(f"{t:.1f}" for t in r["seconds_per_round"][k]) for k in ("uncached", "cached"))
        md.append(f"| {r['threads']} | {r['items_per_s_median']['uncached']:.2f} | "
                  f"{r['items_per_s_median']['cached']:.2f} | **{r['speedup']:.2f}x** | {rounds} | "
                  f"{r['max_abs_logprob_difference']:.1e} | {r['same_prediction']} | "
                  f"{r['load_average_before'][0]:.1f} / {r['load_average_after'][0]:.1f} |")
    (RESULTS / f"bench_eval_{args.device}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
