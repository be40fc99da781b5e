"""What several subcommands share: flags derived from config dataclass fields (`add_field`
for a command's own config, `add_overrides` for the sections of a run config), the help of a
model argument, and the options for data files and CPU threads."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from minigpt.finetune.config import FinetuneConfig
from minigpt.runconfig import Sections
from minigpt.typed import bare_type, field_docs, field_types

Config = TypeVar("Config")

MODEL_HELP = ("a model folder (Hugging Face GPT-2/GPT-Neo layout or minigpt's), a training run folder (its best "
              "checkpoint) or a fine-tuning run folder (its exported model)")


def field_default(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls` (its default_factory called), or
    `dataclasses.MISSING` when the field has none."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def field_help(cls: type, name: str) -> str:
    """The docstring of field `name` of dataclass `cls` on one line, the help of its flag."""
    doc = field_docs(cls).get(name)
    if not doc:
        raise ValueError(f"{cls.__name__}.{name} has no docstring; write one (a string literal right after "
                         f"the field) so that its flag has help")
    return " ".join(doc.split())


def add_field(parser: argparse.ArgumentParser, cls: type, name: str, *, flag: str | None = None,
              choices: Sequence[str] | None = None, note: str = "") -> argparse.Action:
    """Add the flag of field `name` of dataclass `cls`; the parsed value lands in `args.<name>`.

    The flag is `--<name with dashes>` unless `flag` says otherwise. Its default is the
    field's (required when the field has none), its help the field's docstring (plus
    `note`, for what only the command line means), and its type the field's:
    - bool: `--flag` and `--no-flag` (argparse's BooleanOptionalAction); `flag` may
      name either;
    - int or float (or `| None`): converted by argparse;
    - `Literal[...]`, or a text field the config checks against a constant (pass it as
      `choices`): one of those;
    - text whose default holds a newline (templates, separators): ``\\n`` on the
      command line is a newline, and the help shows the default that way.
    Other types (tuples, dicts) have no flag here; write those by hand.
    """
    tp, default = bare_type(field_types(cls)[name]), field_default(cls, name)
    flag = flag or "--" + name.replace("_", "-")
    metavar = flag.removeprefix("--").replace("-", "_").upper()  # as argparse would name it
    help_text = field_help(cls, name) + (f" {note}" if note else "")
    kwargs: dict[str, Any] = dict(dest=name, help=help_text.replace("%", "%%"))  # argparse %-formats help
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    if tp is bool:
        flag = "--" + flag.removeprefix("--").removeprefix("no-")
        kwargs["action"] = argparse.BooleanOptionalAction
    elif tp in (int, float):
        kwargs.update(type=tp, metavar=metavar)
    elif typing.get_origin(tp) is Literal:
        kwargs["choices"] = typing.get_args(tp)
    elif tp is str:
        if choices is not None:
            kwargs["choices"] = tuple(choices)
        else:
            kwargs["metavar"] = metavar
        if isinstance(default, str) and "\n" in default:
            kwargs.update(type=_unescape_newlines, default=default.replace("\n", "\\n"),
                          help=kwargs["help"] + " (\\n for a newline)")
    else:
        raise ValueError(f"{cls.__name__}.{name} has type {tp}, which add_field does not map to a flag; "
                         f"add that flag by hand")
    return parser.add_argument(flag, **kwargs)


def config_from_args(cls: type[Config], args: argparse.Namespace, **values: Any) -> Config:
    """An instance of dataclass `cls` from every field that `args` holds (flags added with
    `add_field`, or by hand with the field's name as dest), then `values`; fields with no
    flag keep their defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{name: value for name, value in vars(args).items() if name in names}, **values})


def add_overrides(parser: argparse.ArgumentParser, sections: Sections,
                  aliases: dict[str, Sequence[str]] | None = None) -> dict[str, argparse.Action]:
    """Add one flag per key of each section of a run config (`minigpt.runconfig`), the one
    way to set a key on the command line: `--section.key=VALUE` (or `--section.key VALUE`),
    `--section.key` / `--no-section.key` for true/false keys. A key that one section alone
    has, and that is no flag of the command already, is also `--key`; `aliases` adds more
    names ('data.path': ['--data']). Call it after the command's own flags.

    Each flag appends 'section.key=VALUE' to `args.overrides`, in command-line order, for the
    run config's loader to convert by the key's type (`minigpt.runconfig.apply_override`),
    so its errors name the key whatever spelling was typed. A key that several sections
    have (`--seed`) is passed on bare, and the loader names the sections to choose from.
    Returns 'section.key' -> its flag (to give one a check of its own, e.g. `.type`).
    """
    parser.set_defaults(overrides=(), override_sections=sections)  # the sections: for main's unknown-flag error
    taken = {canonical(flag) for flag in parser._option_string_actions}
    owners = Counter(key for spec in sections.values() for key in spec.types())
    flags = {}
    for section, spec in sections.items():
        group = parser.add_argument_group(
            f"--{section}.KEY: {spec.cls.__name__} fields ({spec.cls.__module__.replace('.', '/')}.py)")
        docs = field_docs(spec.cls)
        for key, tp in spec.types().items():
            names = [f"--{section}.{key}", *(aliases or {}).get(f"{section}.{key}", ())]
            if owners[key] == 1 and canonical(f"--{key}") not in taken:
                names.append(f"--{key}")
            doc = docs.get(key) or (f"the preset the [{section}] keys go over" if key == spec.restart_key else key)
            flags[f"{section}.{key}"] = group.add_argument(
                *names, key=f"{section}.{key}", help=" ".join(doc.split()).replace("%", "%%"),
                action=_SwitchOverride if bare_type(tp) is bool else _Override, metavar=_type_metavar(tp))
    for key in sorted(k for k, n in owners.items() if n > 1 and canonical(f"--{k}") not in taken):
        parser.add_argument(f"--{key}", key=key, action=_Override, help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="overrides", default=argparse.SUPPRESS, action=_SetIsGone, help=argparse.SUPPRESS)
    return flags


class _Override(argparse.Action):
    """A flag of `add_overrides`: appends 'key=VALUE' to `args.overrides`."""

    def __init__(self, option_strings: list[str], dest: str, key: str, **kwargs: Any) -> None:
        super().__init__(option_strings, "overrides", default=argparse.SUPPRESS, **kwargs)
        self.key = key

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if isinstance(self, argparse.BooleanOptionalAction):
            values = "false" if option_string.startswith("--no-") else "true"
        namespace.overrides = (*namespace.overrides, f"{self.key}={values}")


class _SwitchOverride(_Override, argparse.BooleanOptionalAction):
    """A true/false flag of `add_overrides`: `--key` appends 'key=true', `--no-key` 'key=false'."""


class _SetIsGone(argparse.Action):
    """`--set KEY=VALUE`, the old second way to say `--KEY=VALUE`: refused, naming the flag."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"--set {values}: write --{values} (--set is no longer accepted)")


def canonical(flag: str) -> str:
    """The spelling of `flag` that its dash and underscore spellings share: '--max-steps' and
    '--max_steps' are both '--max_steps'."""
    return "--" + flag.removeprefix("--").replace("-", "_")


def _type_metavar(tp: Any) -> str:
    """INT, FLOAT, LIST, TEXT or {a,b} (a Literal's choices) for a flag of type `tp`."""
    tp = bare_type(tp)
    if typing.get_origin(tp) is Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    return {int: "INT", float: "FLOAT", tuple: "LIST", list: "LIST"}.get(typing.get_origin(tp) or tp, "TEXT")


def _unescape_newlines(text: str) -> str:
    return text.replace("\\n", "\n")


def out_folder(text: str) -> str:
    """The argparse type of every output folder (--out, --out-dir): a file of that name is
    refused before anything runs, where it would otherwise fail after the work was done."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, and this is the folder the output goes into; give a "
                                         f"folder (a new name or an existing folder), or move the file away")
    return text


def out_file(text: str) -> str:
    """The argparse type of every output file (a PNG, a cleaned copy): an existing folder of
    that name is refused up front."""
    if Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, and this is the file to write; give the path of a "
                                         f"file (one inside that folder, if you like)")
    return text


def add_dtype(p: argparse.ArgumentParser) -> None:
    from minigpt.device import DECODE_DTYPES

    p.add_argument("--dtype", choices=list(DECODE_DTYPES), default="float32",
                   help="the weights' dtype while decoding: bfloat16 reads half the bytes per token (faster "
                        "where memory bandwidth bounds decoding, as on a CPU); its greedy tokens can differ "
                        "from float32's at near ties")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (None: torch's default, one per core); on a busy machine fewer "
                        "can be faster")


# The data readers' options below are FinetuneConfig's fields; fewshot, evaluate and finetune
# check pass them to functions whose keyword defaults are the same.

def add_columns(p: argparse.ArgumentParser) -> None:
    for name in ("text_column", "label_column", "merge_label_case"):
        add_field(p, FinetuneConfig, name)


def add_pair_columns(p: argparse.ArgumentParser) -> None:
    for name in ("prompt_column", "completion_column"):
        add_field(p, FinetuneConfig, name)


def add_encoding(p: argparse.ArgumentParser) -> None:
    add_field(p, FinetuneConfig, "encoding")
