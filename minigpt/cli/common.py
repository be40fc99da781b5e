"""What several subcommands share: flags derived from config dataclass fields (`add_field`),
the help of a model argument, and the options for data files and CPU threads."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from minigpt.finetune.config import FinetuneConfig
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
    - bool: `--flag` sets True; a flag named `--no-...` sets False instead (and says so);
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
        const = not flag.startswith("--no-")
        if const == default:
            raise ValueError(f"{flag} would set {cls.__name__}.{name} to its default, {default}; name the flag "
                             f"--no-... to turn it off")
        kwargs.update(action="store_const", const=const)
        if not const:
            kwargs["help"] += f" ({flag} turns this off.)"
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
