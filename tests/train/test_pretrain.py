"""Pretraining set-up: config from recipe + file + overrides, the CLI, sampling, plotting."""
from __future__ import annotations

import dataclasses
import json

import pytest

from minigpt.cli import main
from minigpt.config import GPTConfig
from minigpt.pretrain.config import load_config
from tests.helpers import SHAKESPEARE, need_file


def test_tiny_recipe_is_the_main_job():
    config = load_config("tiny")
    assert config.model == GPTConfig.from_preset("tiny")
    assert config.data.path is None and config.data.tokenizer == "char"  # the shipped tiny Shakespeare
    assert config.train.device == "cpu" and config.train.out_dir == "runs/tiny"


def test_file_then_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\n[model]\nn_layer = 2\n[train]\nlr = 0.002\nout_dir = "r"\n')
    config = load_config(file=toml, overrides=["--train.max_steps=7", "n_head=2", "dropout=0.1", "sample.tokens=0",
                                               "--compile", "data.path=x"])
    assert (config.model.n_layer, config.model.n_head, config.model.dropout) == (2, 2, 0.1)
    assert config.model.n_embd == GPTConfig.from_preset("tiny").n_embd  # the rest of the preset stays
    assert (config.train.lr, config.train.max_steps, config.train.compile) == (0.002, 7, True)
    assert config.data.path == "x" and config.sample.tokens == 0
    again = tmp_path / "again.json"
    again.write_text(json.dumps(config.to_dict()))
    assert load_config(file=again) == config  # run_config.json is itself a config


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=1", r"train has no key 'learning_rate'; valid keys are: .*\blr\b"),
    ("optim.lr=1", r"unknown section 'optim'; sections are model, train, data, sample"),
    ("lrr=1", r"no section has a key 'lrr'. Valid keys are model: .*; train: "),
    ("seed=1", r"'seed' is in several sections; write --train.seed=... or --sample.seed=..."),
    ("train.lr=-1", r"lr=-1.0 must be > 0 \(from --train.lr\)"),
    ("model.n_embd=130", r"n_embd=130 is not divisible by n_head=3"),
    ("data.tokenizer=bpe", r"tokenizer='bpe' must be one of"),
])
def test_bad_overrides_are_named_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("tiny", overrides=[override])


def test_unknown_preset_and_section_in_a_file(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose a recipe"):
        load_config("huge")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"out_dir": "x", "max_steps": 1, "batch_size": 1}, "optimizer": {}}))
    with pytest.raises(ValueError, match="unknown section 'optimizer'"):
        load_config(file=bad)


def test_cli_prepares_trains_samples_resumes_and_plots(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", str(need_file(SHAKESPEARE)), "--out-dir", str(run), "--max_steps=4",
            "--train.batch_size", "2", "--model.n_layer=2", "--block_size=32", "--eval_interval=2", "--eval_steps=1",
            "--sample.tokens=20", "--progress=false", "--warmup_steps=1"]
    main(args)
    out = capsys.readouterr().out
    assert out.startswith("--- sample from ") and len(out.splitlines()) >= 2
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["train"]["max_steps"] == 4 and saved["model"]["n_layer"] == 2
    assert json.loads((run / "checkpoints" / "latest" / "tokenizer.json").read_text())["type"] == "char"

    main(args[:-1] + ["--max_steps=6", "--resume", "--sample.tokens=0", "--warmup_steps=1"])
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6 and (run / "checkpoints" / "step_0000006").is_dir()

    capsys.readouterr()
    main(["sample", "--model", str(run / "checkpoints" / "best"), "--max-new-tokens", "10", "--prompt", "ROMEO:"])
    assert capsys.readouterr().out.startswith("ROMEO:")

    main(["plot", str(run)])
    png = run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main(["plot", str(run), "--x", "time", "--out", str(run / "time.png")])  # across the resume's restarted clock
    assert (run / "time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_axis_continues_across_a_resume():
    from minigpt.plot import _elapsed

    records = [{"wall_s": 1.0}, {"wall_s": 3.0}, {"wall_s": 0.5}, {"wall_s": 2.0}]
    assert _elapsed(records) == [1.0, 3.0, 3.5, 5.0]
    with pytest.raises(ValueError, match="no 'wall_s'.*plot by step"):
        _elapsed([{"step": 1}])


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit, match=r"minigpt prepare: error: .*empty\.txt is empty"):
        main(["prepare", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as err:
        main(["train", "--wibble=1"])  # no key of any section: a usage error, like any unknown flag
    assert err.value.code == 2 and "unrecognized arguments: --wibble=1; valid keys (--section.key=VALUE) are " \
        "model: activation, attention_pattern" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--lrr=1"])  # close to a key: the usage, with the key it resembles
    assert "--lrr: did you mean --lr?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plot", str(tmp_path), "--bogus=1"])  # only `train` takes overrides
    assert "unrecognized arguments: --bogus=1" in capsys.readouterr().err


def test_config_file_alone_starts_from_tiny_recipe(tmp_path):
    toml = tmp_path / "my.toml"
    toml.write_text("[train]\nlr = 0.002\n")
    config = load_config(file=toml)
    assert config.model == GPTConfig.from_preset("tiny")  # not GPT-2 124M
    assert config.train.out_dir == "runs/tiny" and config.train.lr == 0.002 and config.data.tokenizer == "char"
    assert config == load_config("tiny", overrides=["--lr=0.002"])


def test_toml_syntax_error_names_file_and_line(tmp_path):
    toml = tmp_path / "my.toml"
    toml.write_text("[train]\nlr = 1e-3\nmax_steps = \n")
    with pytest.raises(ValueError, match=r"config file .*my\.toml is not valid TOML: .*line 3.*Fix that line"):
        load_config(file=toml)


@pytest.mark.parametrize("text, message", [
    ('{"train": {"lr": 1e-3,}}', r"is not valid JSON: .* line 1, column \d+"),
    ("", r"is empty"),
    ("[1, 2]", r"must hold an object \{...\} at its top level, not a list"),
    ('{"train": 5}', r"section 'train' must be a table of key = value pairs"),
    ('{"train": {"lrr": 1}}', r"\[train\] unknown TrainConfig keys \['lrr'\]; valid keys are: .*\blr\b"),
    ('{"preset": 3}', r"preset=3 must be a recipe or preset name in quotes"),
    ('{"lr": 0.1}', r"'lr' is at the top level, outside any section; put it under \[train\]"),
])
def test_bad_json_config_names_file_and_fix(tmp_path, text, message):
    path = tmp_path / "my.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"config file .*my\.json.*{message}"):
        load_config(file=path)


def test_config_path_that_is_missing_or_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config file .*nope\.toml does not exist"):
        load_config(file=tmp_path / "nope.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ValueError, match=r"config file .*dir\.toml is a folder; give the file itself"):
        load_config(file=tmp_path / "dir.toml")
    (tmp_path / "run.yaml").write_text("lr: 1")
    with pytest.raises(ValueError, match=r"must end in \.toml or \.json"):
        load_config(file=tmp_path / "run.yaml")


def test_value_rule_errors_name_where_the_value_came_from(tmp_path):
    toml = tmp_path / "my.toml"
    toml.write_text("[train]\nbatch_size = 0\n")
    with pytest.raises(ValueError, match=r"\[train\] batch_size=0 must be a positive integer \(from .*my\.toml\)"):
        load_config(file=toml)
    with pytest.raises(ValueError, match=r"\[sample\] top_k=0 must be >= 1.*\(from --sample.top_k\)"):
        load_config(overrides=["--top_k=0"])


def test_gpt2_pretraining_checkpoint_loads_in_auto_tokenizer(tmp_path, capsys, monkeypatch):
    """A pretraining checkpoint with GPT-2's tokenizer holds the files transformers reads,
    not minigpt's own tokenizer.json (which AutoTokenizer cannot read)."""
    transformers = pytest.importorskip("transformers")
    from tests.helpers import use_tiktoken_cache

    use_tiktoken_cache(monkeypatch)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    run = tmp_path / "run"
    main(["train", "--data", str(corpus), "--tokenizer=gpt2", "--out-dir", str(run), "--max_steps=1",
          "--batch_size=2", "--model.n_layer=2", "--model.n_embd=32", "--model.n_head=2", "--block_size=16",
          "--model.vocab_size=50257", "--eval_steps=1", "--sample.tokens=0", "--progress=false", "--warmup_steps=0"])
    folder = run / "checkpoints" / "latest"
    assert not (folder / "tokenizer.json").exists()
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert hf("The quick brown fox")["input_ids"] == [464, 2068, 7586, 21831]
    capsys.readouterr()
    main(["sample", "--model", str(folder), "--prompt", "The", "--max-new-tokens", "2"])  # minigpt reads it too
    assert capsys.readouterr().out.startswith("The")


def test_absurd_block_size_is_refused_up_front_naming_the_sizes(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\n" * 50)
    with pytest.raises(SystemExit) as err:
        main(["train", "--data", str(corpus), "--out-dir", str(tmp_path / "run"), "--block_size=100000",
              "--n_layer=4000", "--max_steps=1"])
    message = str(err.value)
    assert "model.block_size=100000 with train.batch_size=24" in message and "GiB" in message
    assert "--model.block_size" in message  # the fix
    assert not (tmp_path / "run").exists()  # refused before anything was prepared or built


def test_out_of_memory_while_training_is_one_line(tmp_path, monkeypatch):
    from minigpt import cli

    def oom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 4915200000 bytes. Error code 12\nmore")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser, oom))
    with pytest.raises(SystemExit, match=r"minigpt train: error: out of memory \(.*4915200000 bytes.*\); lower the batch"):
        main(["train", "--data", str(tmp_path / "x.txt")])


def _with_func(parser, func):
    parser.set_defaults(func=func)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(func=func)
    return parser


def test_eval_steps_beyond_the_validation_split_warns(tmp_path, caplog):
    import logging

    from minigpt.train.config import TrainConfig
    from minigpt.pretrain.run import warn_eval_cost

    config = TrainConfig(out_dir=str(tmp_path), max_steps=10, batch_size=4, eval_interval=5, eval_steps=1000)
    with caplog.at_level(logging.WARNING):
        warn_eval_cost(config, block_size=16, val_tokens=640)
    assert "train.eval_steps=1000 reads 64,000 tokens per evaluation, 100x the validation split's 640" in caplog.text
    assert "--train.eval_steps=10 reads it about once" in caplog.text
    assert "evaluation will take longer than training: 2 evaluations of 1000 batches" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_eval_cost(dataclasses.replace(config, eval_steps=5), block_size=16, val_tokens=640)
    assert caplog.text == ""
