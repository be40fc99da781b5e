"""CPU speed, side by side: minigpt against Hugging Face transformers on the same weights.

Cases (issue 9):
  gen        greedy decoding with the KV cache, batch 1, 32-token prompt, 128 new tokens,
             GPT-2 shape 6 layers / 6 heads / n_embd 384 / GPT-2 vocabulary
  gen-124m   the same on the GPT-2 124M shape
  gen-batch  four prompts of different lengths (32, 20, 9, 27), left-padded
  train      forward + backward + AdamW, batch 8 x 128 tokens, 6/6/384 shape
  main       the README's main job (`minigpt train`, recipe 'tiny') against nanoGPT's
             documented CPU recipe run by the same trainer (recipe 'nanogpt-cpu'): wall
             time of the whole command, peak memory, final validation loss

Random weights are saved once by `transformers` and loaded by both libraries. Each
measurement runs in a fresh child process so that its peak resident memory is its own;
times are medians over --repeats runs after a warm-up, and the two libraries alternate
for --rounds rounds so that drift in the machine's speed hits both. The training step goes
further: within each round's process the two libraries take turns step by step (a drift of
tens of percent over minutes otherwise spreads the rounds' ratios by more than ±5 %), and
each library's peak memory comes from a process of its own. Writes JSON and a markdown
table.
Never asserts: it reports, including whether the outputs matched.

    python scripts/cpu.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

SHAPES = {"small": dict(n_layer=6, n_head=6, n_embd=384), "124m": dict(n_layer=12, n_head=12, n_embd=768)}
PROMPT_LEN, NEW_TOKENS = 32, 128
BATCH_LENGTHS = (32, 20, 9, 27)
TRAIN_BATCH, TRAIN_T = 8, 128
MAIN_RECIPES = ("tiny", "nanogpt-cpu")
SHAKESPEARE = os.environ.get("MINIGPT_SHAKESPEARE", "../shared/data/tinyshakespeare/input.txt")


def save_random_gpt2(shape: str, folder: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(**SHAPES[shape], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)


def _prompts(lengths):
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50257, (n,), generator=g).tolist() for n in lengths]


def _load(library: str, folder: Path):
    import torch

    if library == "minigpt":
        from minigpt import GPT

        return GPT.from_pretrained(folder).eval()
    import transformers

    return transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()


def _generate(library: str, model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import torch

    if library == "minigpt":
        return model.generate(prompts, new_tokens, temperature=0)
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, use_cache=True, pad_token_id=0)
    return out[:, longest:].tolist()


def _train_steps(models: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Time `repeats` training steps of each library after one untimed step, the libraries
    taking turns step by step (A, B, A, B, ...): a drift in the machine's speed then hits
    both within a second of each other, which separate processes cannot promise."""
    import torch

    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 50257, (TRAIN_BATCH, TRAIN_T + 1), generator=g)
    x, y = idx[:, :-1], idx[:, 1:]
    for model in models.values():
        model.train()
    optimizers = {library: torch.optim.AdamW(model.parameters(), lr=1e-4) for library, model in models.items()}
    times: dict[str, list[float]] = {library: [] for library in models}
    first_loss: dict[str, float] = {}
    for step in range(repeats + 1):
        for library, model in models.items():
            start = time.perf_counter()
            loss = model(x, y).loss if library == "minigpt" else _hf_loss(model, x, y)
            loss.backward()
            optimizers[library].step()
            optimizers[library].zero_grad(set_to_none=True)
            if step == 0:
                first_loss[library] = loss.item()
            else:
                times[library].append(time.perf_counter() - start)
    return times, first_loss


def _hf_loss(model, x, y):
    import torch.nn.functional as F

    logits = model(x).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def _child(case: str, library: str, folder: str, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    result: dict = {"library": library, "case": case}
    if case == "train":
        # "both": the two libraries' steps interleaved in this one process (the speed-up);
        # one library alone: its peak memory, which a shared process would mix up.
        libraries = ("minigpt", "transformers") if library == "both" else (library,)
        times, losses = _train_steps({lib: _load(lib, Path(folder)) for lib in libraries}, repeats)
        result.update(seconds={lib: statistics.median(t) for lib, t in times.items()}, step_seconds=times,
                      tokens=TRAIN_BATCH * TRAIN_T, first_loss=losses)
        result["tokens_per_s"] = {lib: result["tokens"] / t for lib, t in result["seconds"].items()}
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return result
    model = _load(library, Path(folder))
    prompts = _prompts(BATCH_LENGTHS if case == "gen-batch" else (PROMPT_LEN,))
    with torch.no_grad():
        _generate(library, model, prompts, 8)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = _generate(library, model, prompts, NEW_TOKENS)
            times.append(time.perf_counter() - start)
    result.update(seconds=statistics.median(times), tokens=NEW_TOKENS * len(prompts), output=out)
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _main_job(recipe: str, data: str, threads: int) -> dict:
    """One whole `minigpt train` run, as a user types it (plus a scratch run folder)."""
    from minigpt.cli import main as cli

    with tempfile.TemporaryDirectory() as out:
        cli(["train", "--preset", recipe, "--data", data, "--out-dir", out, f"--train.cpu_threads={threads}",
             "--train.progress=false"])
        records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    evals = [(r["step"], r["wall_s"], r["val_loss"]) for r in records if r["kind"] == "eval"]
    return {"library": "minigpt", "case": "main", "recipe": recipe, "evals": evals, "final_val_loss": evals[-1][2],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run_child(*args: str) -> str:
    """Run this script in a fresh interpreter (its own memory peak, no threads shared with us)."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def measure(case: str, library: str, folder: Path, repeats: int, threads: int) -> dict:
    return json.loads(_run_child("--child", case, library, str(folder), str(repeats), str(threads)))


def _compare_main_jobs(data: str, threads: int) -> dict:
    """Each recipe once (they take minutes, so they are not alternated over rounds), in its
    own interpreter; wall time includes start-up and data preparation."""
    runs = {}
    for recipe in MAIN_RECIPES:
        start = time.perf_counter()
        result = json.loads(_run_child("--main-job", recipe, data, str(threads)))
        result["wall_s"] = time.perf_counter() - start
        runs[recipe] = result
    ours, theirs = runs["tiny"], runs["nanogpt-cpu"]
    return {
        "case": "main",
        "shape": "tiny vs nanogpt-cpu recipe",
        "minigpt_wall_s": round(ours["wall_s"], 1),
        "nanogpt_recipe_wall_s": round(theirs["wall_s"], 1),
        "minigpt_val_loss": round(ours["final_val_loss"], 4),
        "nanogpt_recipe_val_loss": round(theirs["final_val_loss"], 4),
        "minigpt_peak_rss_mb": round(ours["peak_rss_mb"]),
        "nanogpt_recipe_peak_rss_mb": round(theirs["peak_rss_mb"]),
        "minigpt_evals": ours["evals"],
        "nanogpt_recipe_evals": theirs["evals"],
    }


def _compare_training_steps(folder: Path, repeats: int, rounds: int, threads: int) -> dict:
    """The training step's speed-up: `rounds` fresh processes, each stepping both libraries
    in turn `repeats` times (its ratio: transformers' median step over minigpt's); then each
    library once alone for its peak memory."""
    runs = [measure("train", "both", folder, repeats, threads) for _ in range(rounds)]
    alone = {lib: measure("train", lib, folder, 2, threads) for lib in ("minigpt", "transformers")}
    speed = {lib: [r["tokens_per_s"][lib] for r in runs] for lib in ("minigpt", "transformers")}
    ratios = [a / b for a, b in zip(speed["minigpt"], speed["transformers"])]
    speedup = statistics.median(ratios)
    return {
        "case": "train",
        "shape": "small",
        "minigpt_tokens_per_s": round(statistics.median(speed["minigpt"]), 1),
        "transformers_tokens_per_s": round(statistics.median(speed["transformers"]), 1),
        "speedup": round(speedup, 3),
        "speedup_per_round": [round(r, 3) for r in ratios],
        "spread": round(max(abs(r / speedup - 1) for r in ratios), 4),
        "step_seconds_per_round": [r["step_seconds"] for r in runs],
        "minigpt_peak_rss_mb": round(alone["minigpt"]["peak_rss_mb"]),
        "transformers_peak_rss_mb": round(alone["transformers"]["peak_rss_mb"]),
        "first_loss_minigpt": runs[0]["first_loss"]["minigpt"],
        "first_loss_transformers": runs[0]["first_loss"]["transformers"],
    }


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        case, library, folder, repeats, threads = sys.argv[2:7]
        print(json.dumps(_child(case, library, folder, int(repeats), int(threads))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--main-job":
        print(json.dumps(_main_job(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--save":
        save_random_gpt2(sys.argv[2], Path(sys.argv[3]))
        return
    # This parent never imports torch: every measurement runs in its own interpreter.
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per process (median)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per library, alternating")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in each run")
    # main first: later cases leave the machine slower (1.5-2 GB processes just ended)
    parser.add_argument("--cases", default="main,gen,gen-124m,gen-batch,train")
    parser.add_argument("--data", default=SHAKESPEARE, help="tiny Shakespeare input.txt for the main job")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for case in args.cases.split(","):
            if case == "main":
                rows.append(_compare_main_jobs(args.data, args.threads))
                print(json.dumps(rows[-1]))
                continue
            shape = "124m" if case == "gen-124m" else "small"
            if shape not in folders:
                folders[shape] = Path(tmp) / shape
                _run_child("--save", shape, str(folders[shape]))
            if case == "train":
                rows.append(_compare_training_steps(folders[shape], args.repeats, args.rounds, args.threads))
                print(json.dumps(rows[-1]))
                continue
            # Alternate the two libraries round by round: the speed of a shared VM drifts by
            # tens of percent over minutes, and a ratio of back-to-back runs cancels most of it.
            rounds = [{lib: measure(case, lib, folders[shape], args.repeats, args.threads)
                       for lib in ("minigpt", "transformers")} for _ in range(args.rounds)]
            mini, hf = rounds[0]["minigpt"], rounds[0]["transformers"]
            speed = {lib: [r[lib]["tokens_per_s"] for r in rounds] for lib in ("minigpt", "transformers")}
            ratios = [a / b for a, b in zip(speed["minigpt"], speed["transformers"])]
            row = {
                "case": case,
                "shape": shape,
                "minigpt_tokens_per_s": round(statistics.median(speed["minigpt"]), 1),
                "transformers_tokens_per_s": round(statistics.median(speed["transformers"]), 1),
                "speedup": round(statistics.median(ratios), 2),
                "speedup_per_round": [round(r, 2) for r in ratios],
                "minigpt_peak_rss_mb": round(mini["peak_rss_mb"]),
                "transformers_peak_rss_mb": round(hf["peak_rss_mb"]),
            }
            row["identical_tokens"] = all(r["minigpt"]["output"] == r["transformers"]["output"] for r in rounds)
            rows.append(row)
            print(json.dumps(row))

    from minigpt.device import describe_cpu  # here, not at the top: the children measure their own imports

    meta = {
        "machine": describe_cpu(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "threads": args.threads,
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
        "repeats": args.repeats,
        "rounds": args.rounds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# CPU: minigpt vs transformers ({meta['date']}, commit {meta['commit']})",
        "",
        f"{meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, {meta['threads']} threads; "
        f"{meta['rounds']} rounds alternating the libraries, each a fresh process timing {meta['repeats']} runs "
        f"after a warm-up; tokens/s are medians, the speed-up is the median of the rounds' ratios "
        f"(per round in cpu.json). Generation: greedy, KV cache, {NEW_TOKENS} new tokens per prompt. "
        f"Train: fwd+bwd+AdamW, batch {TRAIN_BATCH}x{TRAIN_T}; each round is one process in which the two "
        f"libraries take turns step by step, its ratio the two median steps', the spread the largest "
        f"distance of a round's ratio from the median; peak memory from one process per library alone.",
        "",
        "| case | shape | minigpt tok/s | transformers tok/s | speed-up | peak RSS MB (minigpt / transformers) | outputs |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["case"] == "main":
            continue
        same = (f"identical: {r['identical_tokens']}" if "identical_tokens" in r
                else f"first loss {r['first_loss_minigpt']:.5f} vs {r['first_loss_transformers']:.5f}")
        spread = f" (±{100 * r['spread']:.1f} %)" if "spread" in r else ""
        lines.append(f"| {r['case']} | {r['shape']} | {r['minigpt_tokens_per_s']} | {r['transformers_tokens_per_s']} | "
                     f"{r['speedup']}x{spread} | {r['minigpt_peak_rss_mb']} / {r['transformers_peak_rss_mb']} | {same} |")
    for r in rows:
        if r["case"] == "main":
            lines += [
                "",
                "Main job (`minigpt train`, the whole command in a fresh interpreter: start-up, data "
                "preparation, training, evaluations, checkpoint and the final 500-character sample):",
                "",
                "| recipe | wall s | final val loss | peak RSS MB |",
                "| --- | --- | --- | --- |",
                f"| tiny (minigpt's main job) | {r['minigpt_wall_s']} | {r['minigpt_val_loss']} | {r['minigpt_peak_rss_mb']} |",
                f"| nanogpt-cpu (nanoGPT's CPU recipe, same trainer) | {r['nanogpt_recipe_wall_s']} | "
                f"{r['nanogpt_recipe_val_loss']} | {r['nanogpt_recipe_peak_rss_mb']} |",
            ]
    (args.out / "cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
