"""Every command of the README, run top to bottom as written, on tiny settings.

The commands are read from the README's blocks marked `<!-- run: NAME -->`
(`scripts/readme_walk.py`; scripts/first_hour.py runs and times the first-hour block in
full). They run in order, in one scratch folder laid out as the repository root seen by a
reader: `scripts/` (this checkout's), `../shared/data` holding the first rows of each shared
file (GPT-2's BPE files there, as Working offline says), and the files the README's general
forms assume a reader has: a GPT-2 folder (`gpt2/`, `path/to/gpt2`, `path/to/model`: a tiny
random GPT-2 saved by `transformers`, with GPT-2's tokenizer files), `my_corpus/`, a
prompt/completion `data.csv`, and small `hellaswag_val.jsonl`, `lambada.jsonl`,
`my_task.jsonl` and `my_demos.jsonl`. Only tiny overrides are appended (two updates, a small
model for GPT-2's recipe, a few rows, one thread); nothing else is changed, python blocks run
in one namespace, and every command must exit 0.

Not run, and why:
- `pip install ...` (Set-up): it would change this environment; instead the pinned torch is
  checked against the installed one and the `[test]` extra against pyproject.toml.
- `python -m pytest -q` (Set-up): that is this suite.
- `scripts/gpu_suite.sh` (On a GPU) needs CUDA, and `--merge` needs what it brought back: their
  command lines are parsed (`--help` appended); the code paths run on the CPU in
  tests/test_gpu_suite_smoke.py.
"""
from __future__ import annotations

import csv
import json
import re
import shutil

import pytest
import torch

from scripts.readme_walk import (
    ROOT, PythonBlock, minigpt_argv, run_walk, sections, unmarked_blocks, walk_commands, words,
)
from tests.helpers import DATA, need_file

ROWS = {"sentiment": 121, "topics": 121, "headlines": 60}
"""Lines kept of each shared file (a CSV's header included)."""

NOT_RUN = ("pip install ", "python -m pytest")
"""Command prefixes checked, not run (see the module docstring)."""


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
    """Arguments appended to a command (its words as `scripts.readme_walk.words` gives them)."""
    if argv[:1] == ["torchrun"]:
        return tiny(argv[argv.index("minigpt") + 1:])
    if argv[:1] == ["train"]:
        small_model = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
                       "--grad_accum=4"] if "gpt2" in argv else []  # GPT-2's recipe: 40 micro-batches a step
        return ["--max_steps=2", "--eval_interval=2", "--eval_steps=1", "--sample.tokens=3", "--progress=false",
                "--threads=1", *small_model]
    if argv[:1] == ["finetune"] and argv[1] in ("classify", "completion"):
        return ["--max_steps=2", "--eval_interval=2", "--eval_steps=2", "--batch_size=4",
                "--progress=false", "--threads=1"]
    if argv[:1] in (["fewshot"], ["eval"]):
        return ["--limit=6", "--threads=1"]
    if argv[:1] in (["sample"], ["evaluate"], ["predict"], ["logit-lens"], ["serve"]):
        return ["--threads=1"]
    if argv[:1] == ["scripts/gpu_suite.sh"] or argv[:2] == ["python", "scripts/gpu_suite.py"]:
        return ["--help"]  # the GPU commands and the merge of what they bring back: parsed, not run
    return []


def gpt2_folder(folder) -> None:
    """A tiny random GPT-2 as `transformers` saves one (6 layers, 4 heads: the README draws layer 5's
    attention, reads layer 3's pattern and ablates head 2), with GPT-2's tokenizer files."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=6, n_head=4, n_embd=32, n_positions=512)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    bpe = need_file(DATA / "gpt2_bpe")
    shutil.copy(bpe / "encoder.json", folder / "vocab.json")
    shutil.copy(bpe / "vocab.bpe", folder / "merges.txt")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))


def readers_files(folder) -> None:
    """What the README's general forms assume a reader has: a GPT-2 folder, a corpus, a
    prompt/completion CSV, task files (HellaSwag's and LAMBADA's formats, multiple choice), demonstrations."""
    gpt2_folder(folder / "gpt2")
    shakespeare = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    (folder / "my_corpus").mkdir()
    for i in range(2):
        (folder / "my_corpus" / f"part{i}.txt").write_text(shakespeare[i * 5000:(i + 1) * 5000], encoding="utf-8")
    pairs = [json.loads(line) for line in (DATA / "headlines" / "train.jsonl").read_text().splitlines()[:40]]
    with open(folder / "data.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["prompt", "completion"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(pairs)
    with open(DATA / "sentiment" / "validation.csv", encoding="utf-8", newline="") as f:
        reviews = [row["text"] for row in csv.DictReader(f)][:8]
    choices = ["is good .", "is bad .", "is long .", "is short ."]
    (folder / "hellaswag_val.jsonl").write_text("".join(
        json.dumps({"ctx": t, "endings": choices, "label": str(i % 4), "activity_label": "Review"}) + "\n"
        for i, t in enumerate(reviews)), encoding="utf-8")
    (folder / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in reviews), encoding="utf-8")
    for name, part in (("my_task.jsonl", reviews[:4]), ("my_demos.jsonl", reviews[4:])):
        (folder / name).write_text("".join(
            json.dumps({"context": f"Review: {t}\nSentiment:", "choices": ["negative", "positive"], "label": i % 2})
            + "\n" for i, t in enumerate(part)), encoding="utf-8")


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A scratch repository root (returned) beside a small ../shared/data: this checkout's
    scripts/ and a reader's files; GPT-2's BPE files from that data, as Working offline says."""
    need_file(DATA / "sentiment" / "train.csv")
    small_shared_data(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "scripts").symlink_to(ROOT / "scripts", target_is_directory=True)
    readers_files(repo)
    (repo / "path" / "to").mkdir(parents=True)
    for name in ("gpt2", "model"):
        (repo / "path" / "to" / name).symlink_to(repo / "gpt2", target_is_directory=True)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "shared" / "data" / "tiktoken_cache"))
    return repo


def to_run(name: str) -> list:
    return [c for c in walk_commands(name) if not (isinstance(c, str) and c.startswith(NOT_RUN))]


def test_every_readme_command_block_is_marked_to_run():
    assert unmarked_blocks() == [], "mark each ```bash/```python block of README.md with <!-- run: NAME -->"
    assert "first-hour" in sections() and len(sections()) >= 10


def test_readme_install_commands_name_what_exists():
    """The pip lines are not run (they would change this environment): the torch they pin is the
    installed one where that is a CPU build (the README's pin keeps the CPU build; a GPU
    machine installs torch its own way), and the extra they install is declared."""
    installs = [c for name in sections() for c in walk_commands(name) if isinstance(c, str) and c.startswith("pip ")]
    assert "pip install -e ." in installs and 'pip install -e ".[test]"' in installs
    pinned = {c.split("==")[1].split()[0] for c in installs if "torch==" in c}
    assert len(pinned) == 1 and re.fullmatch(r"\d+\.\d+\.\d+", next(iter(pinned))), pinned
    if torch.version.cuda is None:
        assert pinned == {torch.__version__.split("+")[0]}
    assert '\ntest = ["pytest' in (ROOT / "pyproject.toml").read_text()  # [project.optional-dependencies]


def test_readme_runs_write_to_folders_of_their_own():
    """Read top to bottom in one folder, no command starts a run (or an evaluation) where an
    earlier one wrote: `train`, `finetune` and `evaluate` refuse such a folder."""
    seen: dict[str, str] = {}
    for name in sections():
        for command in walk_commands(name):
            argv = words(command)
            if argv[:1] == ["torchrun"]:
                if any(a.startswith("--node_rank=") and a != "--node_rank=0" for a in argv):
                    continue  # another node of a multi-node launch joins node 0's run
                argv = argv[argv.index("minigpt") + 1:]
            opts = dict(zip(argv, argv[1:]))
            if argv[:1] == ["train"]:
                out = opts.get("--out-dir", f"runs/{opts.get('--preset')}")
            elif argv[:1] in (["finetune"], ["evaluate"]) and "--out" in opts:
                out = opts["--out"]
            else:
                continue
            assert out not in seen, f"{command!r} writes to {out}, as {seen[out]!r} did"
            seen[out] = command


def test_readme_first_hour_block_is_a_pretrain_then_finetune_walk():
    commands = [minigpt_argv(c) for c in walk_commands("first-hour")]
    verbs = [" ".join(argv[:2]) for argv in commands if argv]
    assert "train --preset" in verbs and verbs.count("finetune classify") == 4
    for needed in ("evaluate", "predict", "fewshot", "finetune check", "finetune completion"):
        assert any(v.startswith(needed) for v in verbs), needed
    inits = [argv[argv.index("--init") + 1] for argv in commands if argv and "--init" in argv]
    assert "tiny-bpe" in inits and "runs/tiny-bpe" in inits  # from scratch beside pretrained


def test_readme_runs_top_to_bottom_as_written(scratch, capsys):
    namespace: dict = {}
    for name in sections():
        commands = to_run(name)
        try:
            steps = run_walk(commands, scratch, extra=tiny, in_process=True, log=lambda line: None, namespace=namespace)
        except Exception as err:
            raise AssertionError(f"README section {name!r}: {err}") from err
        assert len(steps) == len(commands) > 0, name
    assert "model" in namespace and "cache" in namespace  # the quick tour's and the hooks' blocks ran to the end
    out = capsys.readouterr().out
    assert "a gem of a film" in out and "macro avg" in out
    for run in ("sst2", "sst2-scratch", "agnews", "agnews-scratch", "headlines", "sst2-lora", "pc", "pc-tok",
                "sst2-lm"):
        assert (scratch / "runs" / run / "model" / "config.json").is_file(), run
    for evaluation in ("sst2-eval/metrics.json", "sst2-lora-eval/metrics.json", "eval/results.json"):
        assert (scratch / "runs" / evaluation).is_file(), evaluation
    for figure in ("docs/heads_shakespeare.png", "docs/patch_shakespeare.png", "map.png"):
        assert (scratch / figure).is_file(), figure


def test_walk_reads_lines_as_bash_does(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- run: demo -->\n```bash\nA=1 minigpt eval x.jsonl \\\n    --model m  # comment\n"
                      "pip install a && minigpt sample --prompt $'a\\nb' --stop '&&'\n```\n\n```bash\necho no\n```\n"
                      "<!-- run: demo -->\n```python\nx = 1\n```\n")
    commands = walk_commands("demo", readme)
    assert commands[:3] == ["A=1 minigpt eval x.jsonl --model m", "pip install a",
                            "minigpt sample --prompt $'a\\nb' --stop '&&'"]
    assert commands[3] == PythonBlock("x = 1\n")
    assert minigpt_argv(commands[0]) == ["eval", "x.jsonl", "--model", "m"]
    assert minigpt_argv(commands[2]) == ["sample", "--prompt", "a\nb", "--stop", "&&"]
    assert words(commands[1]) == ["pip", "install", "a"]
    assert unmarked_blocks(readme) == [8]  # the unmarked ```bash fence
    with pytest.raises(ValueError, match="no `<!-- run: other -->`.*demo"):
        walk_commands("other", readme)
