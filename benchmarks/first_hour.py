"""The README's first hour, run as written: pretrain a GPT-2-tokenized model, then fine-tune it.

The commands are read from the README's fenced block that follows the marker
`<!-- first-hour -->`, so what the README prints, what tests/test_readme_walk.py runs and
what this script measures are one list. Each command runs in WORK/repo, beside a
WORK/shared link to the shared data (the README's `../shared/data/...` paths), one after
the other, and its wall time is recorded. `minigpt` lines run as `python -m minigpt` with
this checkout first on PYTHONPATH (so the times include Python's start-up, as a user sees);
other lines run in bash.

From each fine-tuning run's OUT/eval/metrics.json the script reads the validation
accuracy: the from-scratch runs (`--init tiny-bpe`, a fresh random model) beside the
pretrained ones (`--init runs/tiny-bpe`) on the same validation rows. Writes JSON and a
markdown table. Never asserts: it reports.

    python benchmarks/first_hour.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = "<!-- first-hour -->"
DATA = Path(os.environ.get("MINIGPT_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()


def walk_commands(readme: Path = README) -> list[str]:
    """The commands of the README's first-hour block, one per logical line (comments dropped,
    backslash continuations joined)."""
    text = readme.read_text(encoding="utf-8")
    at = text.find(MARKER)
    if at < 0:
        raise ValueError(f"{readme} has no {MARKER} marker before its first-hour commands")
    block = re.search(r"```bash\n(.*?)```", text[at:], re.S)
    if block is None:
        raise ValueError(f"{readme}: no ```bash block after {MARKER}")
    commands, pending = [], ""
    for line in block.group(1).splitlines():
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = _strip_comment(line).strip()
        if line:
            commands.append(line)
    return commands


def _strip_comment(line: str) -> str:
    """`line` without a trailing `# comment` (a # inside quotes stays)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] == " "):
            return line[:i]
    return line


def minigpt_argv(command: str) -> list[str] | None:
    """The arguments after `minigpt` for a minigpt command line, else None. Bash's $'...'
    strings (a prompt with newlines) are decoded as bash does."""
    if not command.startswith("minigpt "):
        return None
    command = re.sub(r"\$'((?:[^'\\]|\\.)*)'",
                     lambda m: shlex.quote(ast.literal_eval("'" + m.group(1) + "'")), command)
    return shlex.split(command)[1:]


def prepare_workdir(work: Path, data: Path = DATA) -> Path:
    """WORK/repo to run in, with WORK/shared/data pointing at `data`; returns WORK/repo."""
    repo = work / "repo"
    repo.mkdir(parents=True, exist_ok=True)
    shared = work / "shared"
    shared.mkdir(exist_ok=True)
    link = shared / "data"
    if not link.exists():
        link.symlink_to(data, target_is_directory=True)
    return repo


def run_walk(commands: Sequence[str], cwd: Path, extra: Callable[[list[str]], list[str]] = lambda argv: [],
             in_process: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """Run the commands in order in `cwd`; `export` lines set the environment of the rest.

    extra(argv) gives arguments appended to a minigpt command (the test's tiny overrides).
    in_process calls minigpt.cli.main directly instead of a child `python -m minigpt`.
    Raises RuntimeError naming the command that failed.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    steps = []
    for command in commands:
        began = time.perf_counter()
        argv = minigpt_argv(command)
        if command.startswith("export "):
            for item in shlex.split(command)[1:]:
                key, _, value = item.partition("=")
                env[key] = os.environ[key] = os.path.expandvars(value.replace("$PWD", str(cwd)))
        elif argv is not None:
            argv = argv + extra(argv)
            log(f"$ minigpt {shlex.join(argv)}")
            if in_process:
                _main_in(cwd, argv)
            else:
                done = subprocess.run([sys.executable, "-m", "minigpt", *argv], cwd=cwd, env=env)
                if done.returncode != 0:
                    raise RuntimeError(f"`{command}` exited with {done.returncode}")
        else:
            log(f"$ {command}")
            done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"`{command}` exited with {done.returncode}")
        steps.append({"command": command, "wall_s": round(time.perf_counter() - began, 1)})
    return steps


def _main_in(cwd: Path, argv: list[str]) -> None:
    from minigpt.cli import main

    before = Path.cwd()
    os.chdir(cwd)
    try:
        main(argv)
    except SystemExit as err:
        if err.code not in (None, 0):
            raise RuntimeError(f"`minigpt {shlex.join(argv)}` exited: {err.code}") from None
    finally:
        os.chdir(before)


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
    commands = [c for c in walk_commands() if not any(text in c for text in args.skip)]
    steps = run_walk(commands, cwd, extra=extra)
    for step in steps:
        argv = minigpt_argv(step["command"])
        if argv and extra(argv):
            step["appended"] = shlex.join(extra(argv))
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"{platform.python_implementation()} {platform.python_version()}",
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
