"""Reading the small JSON and TOML files users hand minigpt (configs, config.json,
tokenizer.json), with errors that name the file, the line and the fix; and writing
folders, JSON files and symlinks atomically (checkpoints), so a crash never leaves half a file.

Every failure here is a `BadFileError`, a ValueError, so the command line prints it as
one paragraph without a traceback.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
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


# Atomic writing ------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (skipped where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_atomically(final: Path, fill: Callable[[Path], None]) -> Path:
    """Create folder `final` by calling `fill(tmp)` on a hidden temporary folder, then renaming it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    fill(tmp)
    for path in tmp.rglob("*"):
        if path.is_file():
            _fsync_file(path)
    fsync_dir(tmp)
    if final.exists():  # saving the same step again (e.g. the best at the last step)
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def point(root: Path, name: str, target: Path) -> None:
    """Make symlink root/name -> target (relative), atomically; silently skipped where unsupported."""
    tmp = root / f".{name}.link"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(target.name, tmp)
        os.replace(tmp, root / name)
    except OSError:
        tmp.unlink(missing_ok=True)
