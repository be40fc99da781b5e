"""The README's first-hour commands, run as written on tiny settings (benchmarks/first_hour.py
runs and times them in full).

The commands run in order, in a scratch repo folder beside a scratch `shared/data` that holds
the first rows of each shared file, so the walk is seconds long: tiny overrides (two updates,
a few tokens) are appended to `train` and `finetune` lines, and nothing else is changed.
"""
from __future__ import annotations

import shutil

import pytest

from benchmarks.first_hour import minigpt_argv, run_walk, walk_commands
from tests.helpers import DATA, need_file

ROWS = {"sentiment": 121, "topics": 121, "headlines": 60}
"""Lines kept of each shared file (a CSV's header included)."""


def small_shared_data(root) -> None:
    """root/shared/data: the first lines of each file the walk reads, and the tokenizer cache."""
    data = root / "shared" / "data"
    shutil.copytree(need_file(DATA / "tiktoken_cache"), data / "tiktoken_cache")
    (data / "tinyshakespeare").mkdir(parents=True)
    text = need_file(DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    (data / "tinyshakespeare" / "input.txt").write_text(text[:20_000], encoding="utf-8")
    for folder, n in ROWS.items():
        (data / folder).mkdir()
        for source in sorted((DATA / folder).glob("*.*")):
            lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
            (data / folder / source.name).write_text("".join(lines[:n]), encoding="utf-8")


def tiny(argv: list[str]) -> list[str]:
    if argv[0] == "train":
        return ["--max_steps=2", "--eval_interval=2", "--eval_steps=1", "--sample.tokens=3", "--progress=false",
                "--threads=1"]
    if argv[0] == "finetune" and argv[1] in ("classify", "completion"):
        return ["--max_steps=2", "--eval_interval=2", "--progress=false", "--threads=1"]
    if argv[0] in ("sample", "fewshot", "evaluate", "predict"):
        return ["--threads=1"]
    return []


def test_readme_first_hour_block_is_a_pretrain_then_finetune_walk():
    commands = [minigpt_argv(c) for c in walk_commands()]
    verbs = [" ".join(argv[:2]) for argv in commands if argv]
    assert "train --preset" in verbs and verbs.count("finetune classify") == 4
    for needed in ("evaluate", "predict", "fewshot", "finetune check", "finetune completion"):
        assert any(v.startswith(needed) for v in verbs), needed
    inits = [argv[argv.index("--init") + 1] for argv in commands if argv and "--init" in argv]
    assert "tiny-bpe" in inits and "runs/tiny-bpe" in inits  # from scratch beside pretrained


def test_readme_first_hour_commands_run_as_written(tmp_path, monkeypatch, capsys):
    need_file(DATA / "sentiment" / "train.csv")
    small_shared_data(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    steps = run_walk(walk_commands(), repo, extra=tiny, in_process=True, log=lambda line: None)
    assert len(steps) == len(walk_commands())
    out = capsys.readouterr().out
    assert "a gem of a film" in out and "macro avg" in out
    for run in ("sst2", "sst2-scratch", "agnews", "agnews-scratch", "headlines"):
        assert (repo / "runs" / run / "model" / "config.json").is_file(), run
    assert (repo / "runs" / "sst2-eval" / "metrics.json").is_file()
