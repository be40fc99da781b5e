"""Training throughput: tokens/s and MFU of one optimizer step, per attention backend, with
and without torch.compile, against transformers' GPT2LMHeadModel of the same shape and
weights, measured in the same run.

A step is what `minigpt.train.loop` does: forward, cross-entropy, backward, AdamW (fused on
CUDA), under bf16 autocast on CUDA and in float32 on the CPU. The first step's loss of every
variant is recorded next to the baseline's, as a check that the same work is timed.

    python benchmarks/bench_train.py                       # CPU: tiny and a small GPT-2 shape
    python benchmarks/bench_train.py --shapes gpt2         # GPT-2 124M (block 1024 on a GPU)

Writes benchmarks/results/bench_train_<device>.json and .md. Never asserts (house rule:
benchmarks never pass or fail).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt import GPT, GPTConfig  # noqa: E402
from minigpt.counts import flops_per_token  # noqa: E402
from minigpt.device import describe_cpu  # noqa: E402
from minigpt.ops import BACKENDS  # noqa: E402
from minigpt.train import TrainConfig, build_optimizer  # noqa: E402
from minigpt.train.observe import peak_flops  # noqa: E402
from minigpt.train.parallel import parallelize  # noqa: E402

# name -> (model config, batch size, sequence length) for CPU and for CUDA.
SHAPES = {
    "tiny": (GPTConfig.from_preset("tiny"), {"cpu": (32, 64), "cuda": (64, 64)}),
    "tiny-dense": (GPTConfig.from_preset("tiny", attention_pattern=("dense",)), {"cpu": (32, 64), "cuda": (64, 64)}),
    "small": (GPTConfig(vocab_size=50257, block_size=1024, n_layer=6, n_head=6, n_embd=384),
              {"cpu": (8, 128), "cuda": (32, 1024)}),
    "gpt2": (GPTConfig.from_preset("gpt2"), {"cpu": (1, 128), "cuda": (16, 1024)}),
    # Two layers (one dense, one banded) at 1 x 16 tokens: scripts/gpu_suite.py --smoke's plumbing check.
    "micro": (GPTConfig.from_preset("tiny", n_layer=2), {"cpu": (1, 16), "cuda": (1, 16)}),
}


def _hf_model(model: GPT, tmp: Path):
    """transformers' GPT2LMHeadModel holding `model`'s weights (dense GPT-2 configs only)."""
    from transformers import GPT2LMHeadModel

    model.save_pretrained(tmp)
    return GPT2LMHeadModel.from_pretrained(tmp)


def _step_fn(model, optimizer, autocast, hf: bool):
    def step(idx, targets):
        with autocast:
            if hf:
                logits = model(input_ids=idx).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            else:
                loss = model(idx, targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def _time(step, idx, targets, device, warmup: int, iters: int) -> tuple[float, float, float]:
    """(median seconds per step, first step's loss, first step's seconds: with torch.compile,
    what compiling costs)."""
    began = time.perf_counter()
    first = float(step(idx, targets))  # float() waits for the device
    first_seconds = time.perf_counter() - began
    for _ in range(warmup - 1):
        step(idx, targets)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        step(idx, targets)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times), first, first_seconds


def bench_shape(name: str, device: torch.device, compile_modes, backends, warmup: int, iters: int,
                tmp: Path, baseline: bool = True) -> list[dict]:
    """One row per (compile mode, backend), then transformers' model of the same weights per
    compile mode when `baseline` (dense configs only)."""
    config, sizes = SHAPES[name]
    B, T = sizes[device.type if device.type in sizes else "cpu"]
    peak, peak_note = peak_flops(device)
    flops = flops_per_token(config, seq_len=T)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    train_config = TrainConfig(out_dir=str(tmp), max_steps=1, batch_size=B)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (B, T), generator=g).to(device)
    targets = torch.randint(0, config.vocab_size, (B, T), generator=g).to(device)
    rows = []

    def record(variant: str, backend: str, compiled: bool, seconds: float | None, loss: float | None, note: str = "",
               first_seconds: float | None = None):
        tok_s = B * T / seconds if seconds else None
        rows.append({
            "shape": name, "variant": variant, "backend": backend, "compile": compiled, "batch": B, "seq_len": T,
            "params": config.num_params(), "ms_per_step": seconds * 1e3 if seconds else None, "tokens_per_s": tok_s,
            "first_step_s": first_seconds,
            "mfu": flops * tok_s / peak if tok_s else None, "first_loss": loss, "peak_rss_mb": _rss_mb(),
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
            "note": note,
        })
        shown = f"{tok_s:,.0f} tok/s, MFU {100 * rows[-1]['mfu']:.1f}%" if tok_s else note
        print(f"{name:10s} {variant:12s} {backend:6s} compile={compiled!s:5s} {shown}", flush=True)

    for compiled in compile_modes:
        for backend in backends:
            if backend == "triton" and device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
                record("minigpt", backend, compiled, None, None, "skipped: Triton needs CUDA (or TRITON_INTERPRET=1)")
                continue
            torch.manual_seed(0)
            model = GPT(config, backend=backend).to(device)
            optimizer = build_optimizer(model, train_config, device)
            # As the training loop runs it: minigpt.train.parallel compiles each block in place.
            run_config = dataclasses.replace(train_config, compile=compiled, backend=backend)
            try:
                with parallelize(model, run_config, "none", device) as target:
                    seconds, loss, first_s = _time(_step_fn(target, optimizer, autocast, hf=False), idx, targets,
                                                   device, warmup, iters)
                record("minigpt", backend, compiled, seconds, loss, first_seconds=first_s)
            except Exception as err:  # a benchmark reports, it does not fail
                record("minigpt", backend, compiled, None, None, f"failed: {type(err).__name__}: {err}"[:200])
            del model, optimizer
        if not baseline:
            continue
        if set(config.layer_kinds) == {"dense"}:
            try:
                torch.manual_seed(0)
                hf = _hf_model(GPT(config), tmp / name).to(device)
                optimizer = build_optimizer(hf, train_config, device)
                target = torch.compile(hf) if compiled else hf
                seconds, loss, first_s = _time(_step_fn(target, optimizer, autocast, hf=True), idx, targets, device,
                                               warmup, iters)
                record("transformers", hf.config._attn_implementation, compiled, seconds, loss, first_seconds=first_s)
            except Exception as err:
                record("transformers", "-", compiled, None, None, f"failed: {type(err).__name__}: {err}"[:200])
        else:
            record("transformers", "-", compiled, None, None, "no baseline: GPT2LMHeadModel has no banded layers")
    for row in rows:
        row["peak_flops"], row["peak_note"] = peak, peak_note
    return rows


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Training step throughput", "",
        f"- machine: {meta['machine']}, {meta['threads']} torch threads, device `{meta['device']}`",
        f"- torch {meta['torch']}, transformers {meta['transformers']}, Python {meta['python']}",
        f"- measured {meta['date']}; load average at start {meta['load_average']}",
        f"- MFU peak: {rows[0]['peak_note'] if rows else '-'}",
        "- step = forward + cross-entropy + backward + AdamW; median of the timed steps; "
        "peak RSS is the process's high-water mark so far (it only grows down the table)", "",
        "| shape | B x T | variant | backend | compile | ms/step | tokens/s | MFU | vs transformers | first loss | "
        "first step s | peak RSS MB | note |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    base = {(r["shape"], r["compile"]): r["tokens_per_s"] for r in rows if r["variant"] == "transformers"}
    for r in rows:
        ref = base.get((r["shape"], r["compile"]))
        ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref and r["tokens_per_s"] else "-"
        fmt = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
        lines.append(
            f"| {r['shape']} | {r['batch']} x {r['seq_len']} | {r['variant']} | {r['backend']} | {r['compile']} | "
            f"{fmt(r['ms_per_step'], '{:.1f}')} | {fmt(r['tokens_per_s'], '{:,.0f}')} | "
            f"{fmt(r['mfu'] and 100 * r['mfu'], '{:.1f}%')} | {ratio} | {fmt(r['first_loss'], '{:.4f}')} | "
            f"{fmt(r.get('first_step_s'), '{:.1f}')} | {r['peak_rss_mb']:.0f} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES),
                        help="default: tiny, tiny-dense, small on CPU; gpt2 on CUDA")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--compile", choices=("both", "off", "on"), default="both")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    shapes = args.shapes or (["gpt2", "small", "tiny"] if device.type == "cuda" else ["tiny", "tiny-dense", "small"])
    modes = {"both": [False, True], "off": [False], "on": [True]}[args.compile]
    import tempfile

    import transformers

    meta = {
        "machine": (f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPUs" if device.type == "cuda"
                    else describe_cpu()),
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in shapes:
            rows += bench_shape(name, device, modes, args.backends, args.warmup, args.iters, Path(tmp))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_train_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(meta, rows))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
