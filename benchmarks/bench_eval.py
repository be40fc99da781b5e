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
from minigpt.evaluation.scoring import score_continuations  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def make_requests(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [([rng.randrange(50257) for _ in range(rng.randint(140, 160))],
             [[rng.randrange(50257) for _ in range(rng.randint(15, 25))] for _ in range(4)]) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, block_size=1024, n_layer=6, n_head=12, n_embd=768)
    model = GPT(config).to(args.device).eval()
    requests = make_requests(args.items)
    score_continuations(model, requests[: args.batch_size], batch_size=args.batch_size)  # warm-up
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    outputs = {}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for name in (("cached", "uncached") if r % 2 == 0 else ("uncached", "cached")):
            start = time.perf_counter()
            outputs[name] = score_continuations(model, requests, batch_size=args.batch_size,
                                                use_cache=name == "cached")
            if args.device != "cpu":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()
    diff = max(abs(a - b) for ra, rb in zip(outputs["cached"], outputs["uncached"]) for sa, sb in zip(ra, rb)
               for a, b in zip(sa.logprobs, sb.logprobs))
    same_pred = sum(max(range(4), key=lambda i: ra[i].total) == max(range(4), key=lambda i: rb[i].total)
                    for ra, rb in zip(outputs["cached"], outputs["uncached"]))
    items_s = {k: args.items / statistics.median(v) for k, v in times.items()}
    result = {
        "job": {"items": args.items, "choices": 4, "context_tokens": "140-160", "choice_tokens": "15-25",
                "batch_size": args.batch_size, "rounds": args.rounds, "model": "6 layers, n_embd 768, 12 heads, "
                "vocab 50257, random weights, float32"},
        "seconds_per_round": times,
        "items_per_s_median": items_s,
        "speedup": items_s["cached"] / items_s["uncached"],
        "max_abs_logprob_difference": diff,
        "same_prediction": f"{same_pred}/{args.items}",
        "environment": {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "load_average_before": load_before, "load_average_after": load_after,
                        "note": "shared 2-core VM; other engineers' jobs may have been running"},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_eval_{args.device}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# bench_eval ({args.device})", "",
          "4-choice items, 1-shot contexts of 140-160 tokens, choices of 15-25 tokens, GPT-2-shaped 6-layer "
          f"model (random weights, float32), batch {args.batch_size} items, median of {args.rounds} rounds "
          "alternating the methods.", "",
          "| method | items/s | seconds per round |", "|---|---|---|"]
    for name in ("uncached", "cached"):
        md.append(f"| {name} | {items_s[name]:.2f} | {', '.join(f'{t:.2f}' for t in times[name])} |")
    md += ["", f"speedup: **{result['speedup']:.2f}x**; largest per-token log-prob difference "
               f"{diff:.2e}; same prediction on {same_pred}/{args.items} items.", "",
           f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; load average "
           f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (a shared machine: other engineers' jobs may "
           "have been running)."]
    (RESULTS / f"bench_eval_{args.device}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
