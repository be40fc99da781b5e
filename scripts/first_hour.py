"""The README's first hour, run as written: pretrain a GPT-2-tokenized model, then fine-tune it.

The commands are read from the README's block marked `<!-- run: first-hour -->`
(`scripts/readme_walk.py`), so what the README prints, what tests/test_readme_walk.py runs
and what this script measures are one list. Each command runs in WORK/repo, beside a
WORK/shared link to the shared data (the README's `../shared/data/...` paths), one after
the other, and its wall time is recorded. `minigpt` lines run as `python -m minigpt` with
this checkout first on PYTHONPATH (so the times include Python's start-up, as a user sees);
other lines run in bash.

From each fine-tuning run's OUT/eval/metrics.json the script reads the validation
accuracy: the from-scratch runs (`--init tiny-bpe`, a fresh random model) beside the
pretrained ones (`--init runs/tiny-bpe`) on the same validation rows. Writes JSON and a
markdown table. Never asserts: it reports.

    python scripts/first_hour.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.readme_walk import minigpt_argv, prepare_workdir, run_walk, walk_commands  # noqa: E402


def accuracies(steps: list[dict], cwd: Path) -> list[dict]:
    """For each `finetune classify` step: init, data, validation accuracy, macro F1, majority baseline."""
    rows = []
    for step in steps:
        argv = minigpt_argv(step["command"]) or []
        if argv[:2] != ["finetune", "classify"]:
            continue
        opts = dict(zip(argv[2::], argv[3::]))
        metrics = json.loads((cwd / opts["--out"] / "eval" / "metrics.json").read_text())
        rows.append({"init": opts["--init"], "train_file": opts["--train-file"], "out": opts["--out"],
                     "accuracy": metrics["accuracy"], "macro_f1": metrics.get("macro_f1"),
                     "majority_baseline": metrics.get("majority_baseline"), "n": metrics.get("n"),
                     "wall_s": step["wall_s"]})
    return rows


def other_figures(steps: list[dict], cwd: Path) -> dict:
    """The pretraining run's last validation loss (its metrics.jsonl) and each `fewshot` step's accuracy
    (its --out folder's metrics.json), the figures the README quotes beside the fine-tunes'."""
    found: dict = {"pretrain": [], "fewshot": []}
    for step in steps:
        argv = minigpt_argv(step["command"]) or []
        opts = dict(zip(argv[1::], argv[2::]))
        if argv[:1] == ["train"] and "--out-dir" in opts:
            evals = [json.loads(line) for line in (cwd / opts["--out-dir"] / "metrics.jsonl").read_text().splitlines()
                     if '"val_loss"' in line]
            if evals:
                found["pretrain"].append({"out": opts["--out-dir"], "step": evals[-1]["step"],
                                          "val_loss": evals[-1]["val_loss"], "wall_s": step["wall_s"]})
        if argv[:1] == ["fewshot"] and "--out" in opts:
            metrics = json.loads((cwd / opts["--out"] / "metrics.json").read_text())
            found["fewshot"].append({"model": argv[1], "data": opts.get("--data"), "k": opts.get("--k"),
                                     "accuracy": metrics["accuracy"], "n": metrics.get("n"),
                                     "majority_baseline": metrics.get("majority_baseline")})
    return found


def to_markdown(result: dict) -> str:
    lines = ["# The README's first hour, measured", "",
             f"{result['machine']}; torch {result['torch']}; {result['note']}", "",
             "| step | wall s |", "| --- | ---: |"]
    lines += [f"| `{s['command']}`" + (f" + `{s['appended']}`" if s.get("appended") else "")
              + f" | {s['wall_s']:.1f} |" for s in result["steps"]]
    lines += [f"| **whole walk** | **{result['total_s']:.1f}** |"]
    if result["accuracy"]:
        lines += ["", "| task | start | validation accuracy | macro F1 | majority baseline | rows | fine-tune wall s |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["accuracy"]:
        task = Path(r["train_file"]).parent.name
        start = "from scratch (random tiny-bpe)" if not r["init"].startswith("runs/") else f"pretrained ({r['init']})"
        lines.append(f"| {task} | {start} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
                     f"{r['majority_baseline']:.3f} | {r['n']} | {r['wall_s']:.1f} |")
    for r in result.get("pretrain", []):
        lines += ["", f"Pretraining ({r['out']}): validation loss {r['val_loss']:.3f} at update {r['step']}."]
    for r in result.get("fewshot", []):
        lines += ["", f"Few-shot, no training ({r['model']}, k = {r['k']}, {r['data']}): accuracy "
                      f"{r['accuracy']:.3f} on {r['n']} rows (majority baseline {r['majority_baseline']:.3f})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/minigpt_first_hour", help="scratch folder (WORK/repo, WORK/shared)")
    p.add_argument("--out", default="benchmarks/results", help="folder for first_hour.json and first_hour.md")
    p.add_argument("--note", default="", help="what else the machine was doing, for the record")
    p.add_argument("--extra", action="append", default=[], metavar="'WORDS:ARGS'",
                   help="append ARGS to the minigpt commands that start with WORDS, e.g. "
                        "'train:--max_steps=100' (repeatable; recorded in the results)")
    p.add_argument("--skip", action="append", default=[], metavar="TEXT",
                   help="leave out the commands that contain TEXT (repeatable; recorded in the results)")
    p.add_argument("--name", default="first_hour", help="results file stem")
    args = p.parse_args()
    import torch

    extras = [(words.split(), shlex.split(more)) for words, _, more in (e.partition(":") for e in args.extra)]

    def extra(argv: list[str]) -> list[str]:
        return [a for words, more in extras if argv[:len(words)] == words for a in more]

    cwd = prepare_workdir(Path(args.work))
    began = time.perf_counter()
    commands = [c for c in walk_commands("first-hour") if not any(text in c for text in args.skip)]
    steps = run_walk(commands, cwd, extra=extra)
    for step in steps:
        argv = minigpt_argv(step["command"])
        if argv and extra(argv):
            step["appended"] = shlex.join(extra(argv))
    from minigpt.device import describe_cpu  # here: the commands it times import minigpt themselves

    result = {"machine": f"{describe_cpu()}, {platform.python_implementation()} {platform.python_version()}",
              "torch": torch.__version__, "note": args.note, "extra": args.extra, "skipped": args.skip, "steps": steps,
              "total_s": round(time.perf_counter() - began, 1), "accuracy": accuracies(steps, cwd),
              **other_figures(steps, cwd)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
