"""CPU cost of the hook points: the model's forward against the same forward without them.

Run from the repository root (no GPU needed):

    python -m benchmarks.bench_hooks [--rounds 15] [--threads 1] [--out benchmarks/results]

"without hook points" is the forward as minigpt computed it before issue 18, op for op
(`plain_forward` below: the same modules and `ops` calls, no `HookPoint`); "with hook
points" is `GPT.forward` with none attached (every `HookPoint` is an identity module call);
"one observer" attaches a single reading hook. Cases are timed in interleaved rounds so
that load from other processes hits them alike; we report the median over rounds of the
mean time per call within a round, and the minimum. One thread by default: on a shared
machine two threads spend most of a small forward waiting for each other. Benchmarks never
assert.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minigpt import GPT, GPTConfig, ops


def plain_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The forward without hook points: logits (B, T, V)."""
    B, T = idx.shape
    x = model.drop(model.tok_emb(idx) + model.pos_emb(torch.arange(T)))
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        q, k, v = attn.qkv(_ln(block.ln_1, x)).split(x.shape[-1], dim=2)
        q, k, v = (t.view(B, T, attn.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y, _ = ops.causal_attention(q, k, v, window=attn.window, scale=attn.scale, backend=attn.backend)
        x = x + attn.resid_dropout(attn.proj(y.transpose(1, 2).reshape(B, T, -1)))
        x = x + mlp.dropout(mlp.proj(F.gelu(mlp.fc(_ln(block.ln_2, x)), approximate=mlp.approximate)))
    return model.lm_head(_ln(model.ln_f, x))


def _ln(ln, x: torch.Tensor) -> torch.Tensor:
    return ops.layer_norm(x, ln.weight, ln.bias, ln.eps, ln.backend)


def _per_call_ms(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def run(rounds: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).eval()  # the main job's model: 4 layers, n_embd 128
    V = model.config.vocab_size
    results = []
    for B, T, calls in ((32, 64, 3), (1, 64, 20), (1, 1, 100)):
        idx = torch.randint(0, V, (B, T))
        with torch.no_grad():
            if not torch.equal(model(idx).logits, plain_forward(model, idx)):
                raise SystemExit("the forward with hook points no longer matches the plain forward")
            cases = {
                "without hook points": lambda: plain_forward(model, idx),
                "with hook points": lambda: model(idx),
            }
            times: dict[str, list[float]] = {name: [] for name in cases}
            times["one observer hook"] = []
            for name, fn in cases.items():
                _per_call_ms(fn, calls)  # warm-up
            for _ in range(rounds):
                for name, fn in cases.items():
                    times[name].append(_per_call_ms(fn, calls))
                with model.hooks([("blocks.3.hook_resid_post", lambda act, hook: None)]):
                    times["one observer hook"].append(_per_call_ms(lambda: model(idx), calls))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        low = {name: min(ts) for name, ts in times.items()}
        base = med["without hook points"]
        results.append({
            "B": B, "T": T, "calls_per_round": calls,
            "median_ms": med, "min_ms": low, "all_ms": times,
            "overhead_pct": {name: 100 * (m / base - 1) for name, m in med.items() if name != "without hook points"},
            "overhead_pct_min": {name: 100 * (m / low["without hook points"] - 1) for name, m in low.items()
                                 if name != "without hook points"},
        })
    return {
        "model": "tiny preset (4 layers, 4 heads, n_embd 128, dense/banded w=32), float32, no_grad",
        "rounds": rounds, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "results": results,
    }


def to_markdown(data: dict) -> str:
    lines = [f"# Hook points: CPU forward cost ({data['model']})", "",
             f"torch {data['torch']}, {data['threads']} threads, median of {data['rounds']} interleaved rounds.", "",
             "| batch x tokens | without hook points (ms) | with hook points (ms) | overhead (median) | "
             "overhead (min) | one observer hook |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in data["results"]:
        m, o, lo = r["median_ms"], r["overhead_pct"], r["overhead_pct_min"]
        lines.append(f"| {r['B']} x {r['T']} | {m['without hook points']:.3f} | {m['with hook points']:.3f} | "
                     f"{o['with hook points']:+.1f} % | {lo['with hook points']:+.1f} % | "
                     f"{m['one observer hook']:.3f} ({o['one observer hook']:+.1f} %) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="folder for hooks.json and hooks.md")
    args = parser.parse_args()
    data = run(args.rounds, args.threads)
    text = to_markdown(data)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "hooks.json").write_text(json.dumps(data, indent=2) + "\n")
        (out / "hooks.md").write_text(text)


if __name__ == "__main__":
    main()
