"""Configs typed at the boundary: one check (minigpt.typed) for Python, TOML, JSON and the CLI."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minigpt.config import GPTConfig
from minigpt.finetune.config import FinetuneConfig, train_overrides
from minigpt.train.config import TrainConfig
from minigpt.pretrain.config import DataConfig, SampleConfig, load_config
from minigpt.typed import BOOL_WORDS, field_types, parse_cli

FLOAT_FIELDS = ["train.lr", "train.beta1", "train.grad_clip", "train.weight_decay", "sample.temperature",
                "data.val_fraction", "model.dropout"]


def write_toml(tmp_path, section: str, line: str):
    path = tmp_path / "run.toml"
    path.write_text(f"[{section}]\n{line}\n")
    return path


@pytest.mark.parametrize("key", FLOAT_FIELDS)
def test_string_for_float_in_toml_names_field_and_type(tmp_path, key):
    section, name = key.split(".")
    path = write_toml(tmp_path, section, f'{name} = "0.5"')
    with pytest.raises(ValueError) as info:
        load_config(file=path)
    message = str(info.value)
    assert f"{key}='0.5' (str) must be a number" in message
    assert f"write {name} = 0.5 without quotes" in message and "run.toml" in message


def test_string_for_float_in_json_spells_the_json_fix(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"train": {"lr": "1e-3"}}))
    with pytest.raises(ValueError, match=r"""train.lr='1e-3' \(str\) must be a number; write "lr": 1e-3 without quotes"""):
        load_config(file=path)


@pytest.mark.parametrize("key", ["train.progress", "train.decay_embeddings", "train.compile", "train.tensorboard",
                                 "data.verify", "model.bias"])
@pytest.mark.parametrize("text", ["no", "false", "yes", "0", "off"])
def test_string_bool_in_config_is_refused(tmp_path, key, text):
    section, name = key.split(".")
    path = write_toml(tmp_path, section, f'{name} = "{text}"')
    with pytest.raises(ValueError, match=rf"{key}='{text}' \(str\) must be true or false"):
        load_config(file=path)


def test_bool_for_int_is_refused_and_int_for_float_is_accepted(tmp_path):
    with pytest.raises(ValueError, match=r"train.max_steps=True \(bool\) must be an integer"):
        load_config(file=write_toml(tmp_path, "train", "max_steps = true"))
    with pytest.raises(ValueError, match=r"train.max_steps=1000.0 \(float\) must be an integer; write max_steps = 1000"):
        load_config(file=write_toml(tmp_path, "train", "max_steps = 1e3"))
    config = load_config(file=write_toml(tmp_path, "train", "grad_clip = 2"))
    assert config.train.grad_clip == 2.0 and isinstance(config.train.grad_clip, float)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nonfinite_number_in_config_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match="sample.temperature=.* must be a finite number"):
        load_config(file=write_toml(tmp_path, "sample", f"temperature = {value}"))


@given(word=st.sampled_from(sorted(BOOL_WORDS)), upper=st.booleans())
def test_cli_bool_spellings(word, upper):
    text = word.upper() if upper else word
    config = load_config(overrides=[f"--progress={text}", f"--train.compile={text}"])
    assert config.train.progress is BOOL_WORDS[word] and config.train.compile is BOOL_WORDS[word]


@given(text=st.text(min_size=1, max_size=8).filter(lambda t: t.strip().lower() not in BOOL_WORDS))
def test_cli_bool_refuses_other_words(text):
    with pytest.raises(ValueError, match=r"--train.progress=.* must be a boolean: one of true, 1, yes, false, 0, no"):
        parse_cli(text, bool, "--train.progress")


@given(value=st.floats(allow_nan=False, allow_infinity=False, min_value=1e-9, max_value=1.0))
def test_cli_numbers_are_converted_by_the_field_type(value):
    config = load_config(overrides=[f"--lr={value!r}", f"--min_lr={value!r}", "--max_steps=1_000"])
    assert config.train.lr == value and config.train.max_steps == 1000


def test_cli_values_that_do_not_fit_name_the_flag():
    with pytest.raises(ValueError, match=r"--train.lr='abc' must be a number"):
        load_config(overrides=["--lr=abc"])
    with pytest.raises(ValueError, match=r"--train.max_steps='1e3' must be an integer; write e.g. --train.max_steps=1000"):
        load_config(overrides=["--max_steps=1e3"])
    with pytest.raises(ValueError, match=r"--train.lr needs a value"):
        load_config(overrides=["--lr"])
    assert load_config(overrides=["--top_k=none"]).sample.top_k is None
    assert load_config(overrides=["--attention_pattern=dense,banded"]).model.attention_pattern == ("dense", "banded")
    assert train_overrides(["--progress=no", "lr=1e-3"]) == {"progress": False, "lr": 1e-3}


def test_tilde_in_out_dir_is_expanded(tmp_path):
    home = os.path.expanduser("~")
    config = load_config(file=write_toml(tmp_path, "train", 'out_dir = "~/runs/x"'), overrides=["--data.path=~/d"])
    assert config.train.out_dir == os.path.join(home, "runs/x") and config.data.path == os.path.join(home, "d")
    finetune = FinetuneConfig(task="classify", train_file="~/t.csv", init="~/m")
    assert (finetune.train_file, finetune.init) == (os.path.join(home, "t.csv"), os.path.join(home, "m"))


# A value of the wrong type for every field of every config dataclass, built in Python.
REQUIRED = {TrainConfig: dict(out_dir="r", max_steps=1, batch_size=1),
            FinetuneConfig: dict(task="classify", train_file="t.csv")}
WRONG = {str: 3, int: "3", float: "0.5", bool: "yes"}


def _wrong_value(tp):
    for simple, wrong in WRONG.items():
        if tp == simple or tp == (simple | None):
            return wrong
    return object()  # nothing is an object() of the declared type: tuples, Annotated paths, ...


@pytest.mark.parametrize("cls, name", [(cls, f.name) for cls in (GPTConfig, TrainConfig, DataConfig, SampleConfig,
                                                                    FinetuneConfig) for f in dataclasses.fields(cls)])
def test_every_config_field_refuses_a_value_of_the_wrong_type(cls, name):
    values = {**REQUIRED.get(cls, {}), name: _wrong_value(field_types(cls)[name])}
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name}=.* must be "):
        cls(**values)


def test_path_fields_take_pathlib_paths_and_refuse_empty_text(tmp_path):
    config = TrainConfig(out_dir=tmp_path / "run", max_steps=1, batch_size=1)
    assert config.out_dir == str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"TrainConfig.out_dir='' \(str\) must be a path, not empty text"):
        TrainConfig(out_dir="", max_steps=1, batch_size=1)
    with pytest.raises(ValueError, match=r"data.path='' \(str\) must be a path, not empty text, or None"):
        load_config(overrides=["--data.path="])


def test_optional_fields_keep_the_rule_of_their_type():
    assert load_config(overrides=["--top_k=5"]).sample.top_k == 5
    with pytest.raises(ValueError, match=r"--sample.top_k='x' must be an integer"):
        load_config(overrides=["--top_k=x"])
    with pytest.raises(ValueError, match=r"train.peak_flops=nan \(float\) must be a finite number, or None"):
        load_config(overrides=["--peak_flops=nan"])
