"""Flags of config fields are derived from the dataclass (`minigpt.cli.common.add_field`), so
`--help` cannot drift from the code: every such flag's default is the field's default, its
help holds the field's docstring, and the config built from default flags is the default
config. A flag that is neither a field nor listed below as the command line's own fails. Each
key of a run config's sections is a flag too (`add_overrides`), which hands `--section.key=VALUE`
to the config loader in command-line order."""
import argparse
import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

from minigpt.cli import build_parser, main
from minigpt.cli.common import add_field, field_default, field_help
from minigpt.cli.evaluate import fewshot_prompt, prompt_format
from minigpt.cli.finetune import finetune_config
from minigpt.cli.pretrain import prepare_config
from minigpt.evaluation.prompts import PromptFormat
from minigpt.finetune.config import TRAIN_SECTION, FinetuneConfig
from minigpt.finetune.fewshot import FewShotPrompt
from minigpt.pretrain.config import SECTIONS, PrepareConfig
from minigpt.typed import field_docs

FINETUNE_ARGS = ["--init", "base", "--train-file", "train.csv", "--out", "run"]
# Flags that are the command line's own (no field of the command's configs by that name), or
# that deliberately differ from the field of the same name (the comment at the flag says why).
RUN_FOLDER = {"out", "resume", "overwrite", "overrides", "threads"}
COMMANDS = {
    # command: (the fewest arguments it parses, the configs its flags come from, its own flags)
    ("finetune", "classify"): (FINETUNE_ARGS, (FinetuneConfig,), RUN_FOLDER | {"init"}),
    ("finetune", "completion"): (FINETUNE_ARGS, (FinetuneConfig,), RUN_FOLDER | {"init"}),
    ("finetune", "check"): (["data.jsonl"], (FinetuneConfig,), {"file", "model", "block_size", "fix", "out"}),
    ("prepare",): (["in.txt", "--out", "shards"], (PrepareConfig,), {"inputs"}),
    ("fewshot",): (["lm", "--shots", "s.csv", "--data", "d.csv"], (FewShotPrompt, FinetuneConfig),
                   {"model", "shots", "data", "k", "verbalizer", "limit", "seed", "out", "device", "threads"}),
    # evaluate's --max-generate (100) is not FinetuneConfig.max_generate (50, the fine-tune's own
    # final evaluation): it is `minigpt.finetune.evaluate.evaluate`'s argument.
    ("evaluate",): (["model", "d.csv"], (FinetuneConfig,),
                    {"model", "data", "out", "overwrite", "batch_size", "max_generate", "device", "threads"}),
    ("predict",): (["model"], (FinetuneConfig,), {"model", "texts", "file", "json", "batch_size", "device", "threads"}),
    ("eval",): (["t.jsonl", "--model", "lm"], (PromptFormat,),
                {"tasks", "model", "shots", "demos", "fewshot_file", "limit", "out", "seed", "batch_size", "backend", "device",
                 "threads"}),
}


def _subparser(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> argparse.ArgumentParser:
    for name in names:
        (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _first_sentence(text: str) -> str:
    return " ".join(text.split()).split(". ")[0]


def _drift(parser: argparse.ArgumentParser, args: argparse.Namespace, configs: tuple[type, ...],
           own: set[str]) -> list[str]:
    """What in `parser`'s flags disagrees with the fields of `configs` (the first that has a
    flag's dest is its source); `args` is what the parser made of the fewest arguments."""
    problems = []
    for action in parser._actions:
        if action.dest in own | {"help"}:
            continue
        source = next((c for c in configs if action.dest in {f.name for f in dataclasses.fields(c)}), None)
        if source is None:
            problems.append(f"{action.option_strings or action.dest}: no field of {[c.__name__ for c in configs]}; "
                            f"derive it with add_field or list it as the command line's own")
            continue
        where = f"{action.option_strings} <- {source.__name__}.{action.dest}"
        default = field_default(source, action.dest)
        parsed = getattr(args, action.dest)
        if default is not dataclasses.MISSING and parsed != default:
            problems.append(f"{where}: parses to {parsed!r} by default, the field's default is {default!r}")
        if _first_sentence(field_help(source, action.dest)).replace("%", "%%") not in (action.help or ""):
            problems.append(f"{where}: help {action.help!r} lacks the field's docstring")
    return problems


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_config_flag_has_its_fields_default_and_docstring(command):
    argv, configs, own = COMMANDS[command]
    parser = build_parser()
    args = parser.parse_args([*command, *argv])
    assert _drift(_subparser(parser, command), args, configs, own) == []


def test_a_hand_written_drifting_default_is_caught():
    parser = argparse.ArgumentParser()
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="Share of the training file held out when no val_file is given.")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="the LoRA scale")
    parser.add_argument("--template", default="Review: {text}\\nSentiment:")  # the escape left unconverted
    problems = _drift(parser, parser.parse_args([]), (FinetuneConfig,), set())
    assert len(problems) == 4, problems
    assert "parses to 0.2" in problems[0] and "lacks the field's docstring" in problems[1]


def test_default_flags_build_the_default_configs():
    parser = build_parser()
    for task in ("classify", "completion"):
        args = parser.parse_args(["finetune", task, *FINETUNE_ARGS])
        assert finetune_config(args) == FinetuneConfig(task=task, init="base", train_file="train.csv")
    args = parser.parse_args(["prepare", "a.txt", "b.jsonl", "--out", "shards"])
    assert prepare_config(args) == PrepareConfig(inputs=("a.txt", "b.jsonl"), out_dir="shards")
    assert fewshot_prompt(parser.parse_args(["fewshot", "lm", "--shots", "s", "--data", "d"])) == FewShotPrompt()
    assert prompt_format(parser.parse_args(["eval", "t.jsonl", "--model", "lm"])) == PromptFormat()


def test_flags_mean_what_they_meant_before_they_were_derived():
    parser = build_parser()
    args = parser.parse_args(["finetune", "completion", *FINETUNE_ARGS, "--no-eos", "--lora-rank", "4",
                              "--lora-alpha", "8", "--val-fraction", "0.25", "--packing"])
    config = finetune_config(args)
    assert (config.add_eos, config.lora_rank, config.lora_alpha, config.val_fraction, config.packing) \
        == (False, 4, 8.0, 0.25, True)
    args = parser.parse_args(["finetune", "classify", *FINETUNE_ARGS, "--as-completion", "--template",
                              "Q: {text}\\nA:", "--class-weights", "balanced", "--max-length", "64"])
    config = finetune_config(args)
    assert (config.template, config.class_weights, config.max_length) == ("Q: {text}\nA:", "balanced", 64)
    with pytest.raises(SystemExit):  # not a choice
        parser.parse_args(["finetune", "classify", *FINETUNE_ARGS, "--class-weights", "inverse"])
    args = parser.parse_args(["prepare", "a.txt", "--out", "o", "--no-eos", "--workers", "3", "--errors", "replace"])
    config = prepare_config(args)
    assert (config.eos, config.num_workers, config.errors) == (False, 3, "replace")
    args = parser.parse_args(["eval", "t.jsonl", "--model", "lm", "--unconditional-prompt", "", "--stop", "\\n\\n"])
    assert (prompt_format(args).unconditional_prompt, prompt_format(args).stop) == (None, "\n\n")
    args = parser.parse_args(["fewshot", "lm", "--shots", "s", "--data", "d", "--verbalizer", "sci=science",
                              "--separator", "\\n", "--normalize"])
    assert fewshot_prompt(args) == FewShotPrompt(separator="\n", verbalizers={"sci": "science"}, normalize=True)


@pytest.mark.parametrize("command, sections", [(("train",), SECTIONS), (("finetune", "classify"), TRAIN_SECTION)],
                         ids=["train", "finetune classify"])
def test_every_key_of_a_run_config_is_a_flag_with_its_docstring(command, sections):
    flags = _subparser(build_parser(), command)._option_string_actions
    for section, spec in sections.items():
        for key in spec.types():
            doc = field_docs(spec.cls).get(key)
            assert doc is None or _first_sentence(doc) in flags[f"--{section}.{key}"].help, f"{section}.{key}"


def test_run_config_flags_are_overrides_in_command_line_order():
    parser = build_parser()
    args = parser.parse_args(["train", "--data", "d", "--train.lr", "1e-3", "--max_steps=5", "--no-progress",
                              "--out_dir", "o", "--model.bias", "--seed=3"])
    assert args.overrides == ("data.path=d", "train.lr=1e-3", "train.max_steps=5", "train.progress=false",
                              "train.out_dir=o", "model.bias=true", "seed=3")  # seed: the loader names the sections
    assert parser.parse_args(["train"]).overrides == ()


@pytest.mark.parametrize("argv, says", [
    (["train", "--set", "train.lr=1e-3"], "--set train.lr=1e-3: write --train.lr=1e-3"),
    (["finetune", "classify", *FINETUNE_ARGS, "--set", "lr=1e-4"], "--set lr=1e-4: write --lr=1e-4"),
    (["train", "--progress=maybe"], "--progress=maybe: --progress is true/false; write --progress or --no-progress"),
    (["train", "--wibble=1"], "unrecognized arguments: --wibble=1"),
])
def test_a_spelling_that_is_gone_or_unknown_is_a_usage_error_naming_the_flag(argv, says, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2 and says in capsys.readouterr().err


def test_a_true_false_word_is_the_flag_or_its_no_flag():
    from minigpt.cli import _respelled

    parser = build_parser()
    argv = ["train", "--progress=false", "--train.compile=yes", "--no-verify=0"]
    assert _respelled(parser, argv)[1:] == ["--no-progress", "--train.compile", "--verify"]
    argv = ["finetune", "completion", "--packing=true", "--no-eos"]
    assert _respelled(parser, argv)[2:] == ["--packing", "--no-eos"]


@dataclass(frozen=True)
class _Base:
    size: int = 3
    """How many; 100% of them."""


@dataclass(frozen=True)
class _Child(_Base):
    mode: Literal["a", "b"] = "a"
    """The mode,
    on two lines."""
    quiet: bool = False
    undocumented: str = ""


def test_field_docs_reads_each_fields_string_including_inherited_ones():
    assert field_docs(_Child) == {"size": "How many; 100% of them.", "mode": "The mode,\non two lines."}


def test_add_field_maps_types_and_refuses_fields_without_a_docstring():
    parser = argparse.ArgumentParser()
    add_field(parser, _Child, "size")
    add_field(parser, _Child, "mode")
    assert vars(parser.parse_args([])) == {"size": 3, "mode": "a"}
    assert vars(parser.parse_args(["--size", "5", "--mode", "b"])) == {"size": 5, "mode": "b"}
    assert "100%" in parser.format_help()  # argparse's %-formatting does not choke on it
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    with pytest.raises(ValueError, match="_Child.quiet has no docstring"):
        add_field(parser, _Child, "quiet")
