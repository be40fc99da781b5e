"""Reading the small JSON and TOML files users hand minigpt (configs, config.json,
tokenizer.json), with errors that name the file, the line and the fix.

Every failure here is a `BadFileError`, a ValueError, so the command line prints it as
one paragraph without a traceback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class BadFileError(ValueError):
    """A file that exists but cannot be used: unreadable, damaged, or of the wrong shape."""


def existing_file(path: str | Path, what: str) -> Path:
    """`path` as a Path to an existing regular file, or FileNotFoundError / BadFileError
    saying what it was meant to be."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise BadFileError(f"{what} {path} is a folder; give the file itself")
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def _text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM some editors write is not part of the JSON
    except UnicodeDecodeError as err:
        raise BadFileError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                           f"save it as UTF-8") from None


def read_json(path: str | Path, what: str = "JSON file", expect: type = dict) -> Any:
    """The JSON in `path`; `expect` (dict or list) is the type its top level must have.

    Raises FileNotFoundError when it is absent and BadFileError when it is empty, not
    JSON (naming the line and column), or of the wrong shape.
    """
    path = existing_file(path, what)
    text = _text(path, what)
    if not text.strip():
        raise BadFileError(f"{what} {path} is empty; it may have been cut off while being written. "
                           f"Restore or re-create it")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadFileError(f"{what} {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}. "
                           f"Fix that line, or restore or re-create the file") from None
    if not isinstance(value, expect):
        shape = {dict: "an object {...}", list: "a list [...]"}.get(expect, expect.__name__)
        raise BadFileError(f"{what} {path} must hold {shape} at its top level, not a {type(value).__name__}")
    return value


def read_toml(path: str | Path, what: str = "TOML file") -> dict[str, Any]:
    """The TOML in `path`; syntax errors name the file, line and column."""
    path = existing_file(path, what)
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise BadFileError(f"{path}: reading TOML needs Python >= 3.11 (tomllib); write the config as JSON") from None
    text = _text(path, what)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise BadFileError(f"{what} {path} is not valid TOML: {err}. Fix that line (text values need quotes, "
                           f"sections are written [train], keys as key = value)") from None
