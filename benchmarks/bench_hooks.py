"""CPU cost of the hook points: the model's forward against the same forward without them.

Run from the repository root (no GPU needed):

    python -m benchmarks.bench_hooks [--rounds 15] [--threads 1] [--compare COMMIT] [--out benchmarks/results]

"without hook points" is `GPT.forward` of the commit this work started from (`BEFORE`,
read with git), with the same weights and today's input checks (shape, dtype and length;
issue 16 moved the token-id range check, a min/max over the ids, out of the forward), so
that the two forwards differ only by the hook points; "with hook points" is `GPT.forward`
with none attached (every `HookPoint` returns its input); "one observer" attaches a single
reading hook; `--compare COMMIT` adds "hook points at COMMIT", the model and hook points of
that commit (its `model.py` and `hooks.py`, read with git), to compare two mechanisms in
the same rounds. Cases are timed in interleaved rounds so
that load from other processes hits them alike; we report the median over rounds of the
mean time per call within a round, and the minimum. One thread by default: on a shared
machine two threads spend most of a small forward waiting for each other. Benchmarks never
assert.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

import minigpt
from minigpt import GPT, GPTConfig
from minigpt.device import describe_cpu

ROOT = Path(__file__).resolve().parents[1]


BEFORE = "8ea3ad8"
"""The commit this branch started from: its `minigpt/model.py` has no hook points."""


def _import_at(commit: str, path: str, name: str):
    """The module `path` of `commit` (read with git), imported as `name` from a temp file."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def model_at(commit: str, model: GPT) -> torch.nn.Module:
    """The same weights in the GPT class of `commit`, with that commit's `minigpt.hooks` where
    it has one, and today's input checks, so that only the hook points differ."""
    has_hooks = subprocess.run(["git", "cat-file", "-e", f"{commit}:minigpt/hooks.py"], cwd=ROOT,
                               stderr=subprocess.DEVNULL).returncode == 0
    hooks = _import_at(commit, "minigpt/hooks.py", f"hooks_{commit}") if has_hooks else minigpt.hooks
    with mock.patch.dict(sys.modules, {"minigpt.hooks": hooks}), mock.patch.object(minigpt, "hooks", hooks):
        module = _import_at(commit, "minigpt/model.py", f"model_{commit}")
    module.GPT._check_input = GPT._check_input
    twin = module.GPT(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def _per_call_ms(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def run(rounds: int, threads: int, compare: str | None = None) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).eval()  # the main job's model
    before = model_at(BEFORE, model)
    other = model_at(compare, model) if compare else None
    V = model.config.vocab_size
    results = []
    for B, T, calls in ((32, 64, 3), (1, 64, 20), (1, 1, 100)):
        idx = torch.randint(0, V, (B, T))
        with torch.no_grad():
            cases = {
                "without hook points": lambda: before(idx).logits,
                "with hook points": lambda: model(idx).logits,
            }
            if other is not None:
                cases[f"hook points at {compare}"] = lambda: other(idx).logits
            if not all(torch.equal(fn(), before(idx).logits) for fn in cases.values()):
                raise SystemExit("a forward with hook points no longer matches the one before them")
            times: dict[str, list[float]] = {name: [] for name in cases}
            times["one observer hook"] = []
            for name, fn in cases.items():
                _per_call_ms(fn, calls)  # warm-up
            for _ in range(rounds):
                for name, fn in cases.items():
                    times[name].append(_per_call_ms(fn, calls))
                with model.hooks([("blocks.3.hook_resid_post", lambda act, hook: None)]):
                    times["one observer hook"].append(_per_call_ms(lambda: model(idx).logits, calls))
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
    c = model.config
    return {
        "model": f"tiny preset ({c.n_layer} layers, {c.n_head} heads, n_embd {c.n_embd}, "
                 f"{'/'.join(c.attention_pattern)} w={c.attention_window}), float32, no_grad",
        "compare": compare, "rounds": rounds, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": describe_cpu(), "results": results,
    }


def to_markdown(data: dict) -> str:
    names = list(data["results"][0]["median_ms"])  # "without hook points" first
    lines = [f"# Hook points: CPU forward cost ({data['model']})", "",
             f"torch {data['torch']}, {data['threads']} threads, median of {data['rounds']} interleaved rounds; "
             "each case in ms, then its overhead over the forward without hook points (median; min in brackets).", "",
             "| batch x tokens | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for r in data["results"]:
        m, o, lo = r["median_ms"], r["overhead_pct"], r["overhead_pct_min"]
        cells = [f"{m[names[0]]:.3f}"] + [f"{m[n]:.3f} ({o[n]:+.1f} %, min {lo[n]:+.1f} %)" for n in names[1:]]
        lines.append(f"| {r['B']} x {r['T']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare", default=None, help="also time the model and hook points of this commit")
    parser.add_argument("--out", default=None, help="folder for hooks.json and hooks.md")
    args = parser.parse_args()
    data = run(args.rounds, args.threads, args.compare)
    text = to_markdown(data)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "hooks.json").write_text(json.dumps(data, indent=2) + "\n")
        (out / "hooks.md").write_text(text)


if __name__ == "__main__":
    main()
