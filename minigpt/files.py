"""Reading the small JSON and TOML files users hand minigpt (configs, config.json,
tokenizer.json) and the ones minigpt writes for itself (meta.json, labels.json), with
errors that name the file, the line, the missing key and the fix; reading a .safetensors
file (a model's, a checkpoint's, a classifier head's) with one message for a damaged
one (`DamagedWeightsError`); and writing folders,
JSON and text files atomically (checkpoints, reports), so a crash never leaves half a file.

Every read failure here is a `BadFileError`, a ValueError, so the command line prints it
as one paragraph without a traceback. A write that fails for want of space or permission
(a full disk, a read-only file system) is a `WriteError` naming the path and how to go on:
one writer (`writing`) turns every such OSError into that message, so a checkpoint, a
prepared shard, an evaluation report and a plot all fail the same way.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file


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


def read_json(path: str | Path, what: str = "JSON file", expect: type = dict, keys: Iterable[str] = (),
              fix: str = "restore or re-create the file") -> Any:
    """The JSON in `path`; `expect` (dict or list) is the type its top level must have, and
    `keys` the keys an object must hold. `fix` ends every message: how to get a good file
    back (for files minigpt wrote itself, the command that writes them).

    Raises FileNotFoundError when it is absent and BadFileError when it is empty, not
    JSON (naming the line and column), of the wrong shape, or lacks one of `keys`.
    """
    path = existing_file(path, what)
    text = _text(path, what)
    if not text.strip():
        raise BadFileError(f"{what} {path} is empty; it may have been cut off while being written. "
                           f"{fix[:1].upper()}{fix[1:]}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadFileError(f"{what} {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}. "
                           f"Fix that line, or {fix}") from None
    if not isinstance(value, expect):
        shape = {dict: "an object {...}", list: "a list [...]"}.get(expect, expect.__name__)
        raise BadFileError(f"{what} {path} must hold {shape} at its top level, not a {type(value).__name__}; {fix}")
    missing = [key for key in keys if key not in value]
    if missing:
        raise BadFileError(missing_keys(path, what, missing, value, fix))
    return value


def missing_keys(path: Path, what: str, missing: list[str], value: dict, fix: str) -> str:
    """The message for `what` `path` lacking `missing` keys (read_json's, and readers' of nested keys)."""
    keys = " and ".join(repr(k) for k in missing)
    return (f"{what} {path} lacks the key{'s' if len(missing) > 1 else ''} {keys} (it holds "
            f"{', '.join(map(repr, value)) or 'nothing'}); it is damaged or not minigpt's: {fix}")


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


class DamagedWeightsError(BadFileError):
    """A weights file that exists but cannot be read: empty, cut short, or not tensors.

    Loaders that can fall back to another checkpoint (resume) catch this one type."""


def damaged(path: Path, err: BaseException) -> DamagedWeightsError:
    """The error for a weights file that could not be read: names it, says how big it is
    (an empty file is the usual remains of a crash) and what to do."""
    size = path.stat().st_size if path.is_file() else None
    detail = "it is empty: 0 bytes" if size == 0 else f"{size} bytes; {str(err).split('. ')[0] or type(err).__name__}"
    return DamagedWeightsError(
        f"weights file {path} is damaged or incomplete ({detail}); it was probably cut off while being "
        f"written or downloaded. Re-save or re-download the model, or load another checkpoint"
    )


def load_safetensors(path: Path) -> dict[str, Any]:
    """The tensors of one .safetensors file; a damaged file is a `DamagedWeightsError`
    naming it, never a bare SafetensorError."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise damaged(path, err) from None


# Writing -------------------------------------------------------------------------------
class WriteError(OSError):
    """A write that failed for want of space or permission; its message names the path and the way on."""


_CANNOT_WRITE = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission was denied",
    errno.EPERM: "permission was denied",
}
# Writers outside Python's io (safetensors' Rust, torch's zip writer) report the OS error in text.
_OS_CODE = re.compile(r"Os \{ code: (\d+)")
AGAIN = ("free space (or choose a folder you may write to), then run the same command again; a training run "
         "continues from its newest whole checkpoint with --resume")
"""What to do after a failed write, the default of `writing`'s message."""
EVAL_AGAIN = "free space (or give another --out), then run the same command again"
"""What to do after a report, a table or a plot could not be written."""


def _write_errno(err: BaseException) -> int | None:
    """The errno of a failed write, also when a non-Python writer wrapped it in its own error."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    found = _OS_CODE.search(str(err))
    if found:
        return int(found.group(1))
    if "PytorchStreamWriter failed writing" in str(err) or "file write failed" in str(err):
        return errno.ENOSPC  # torch.save names no cause; a failed write is almost always a full disk
    return None


@contextmanager
def writing(path: str | Path, then: str = AGAIN) -> Iterator[None]:
    """Turn a write into `path` that fails for want of space or permission into one WriteError
    naming the path, what the system said and `then` (how to go on); other errors pass."""
    try:
        yield
    except WriteError:
        raise
    except Exception as err:
        code = _write_errno(err)
        if code not in _CANNOT_WRITE:
            raise
        raise WriteError(f"cannot write {path}: {_CANNOT_WRITE[code]} ({os.strerror(code)}); {then}") from None


def write_text(path: str | Path, text: str, then: str = AGAIN) -> Path:
    """Write `text` to `path` (UTF-8) through a temporary file renamed into place, so a
    failed write leaves the old file whole; failures to write are `WriteError`s."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, then):
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


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


def write_atomically(final: Path, fill: Callable[[Path], None], then: str = AGAIN) -> Path:
    """Create folder `final` by calling `fill(tmp)` on a hidden temporary folder, then renaming it.

    A failed fill removes the temporary folder (giving its space back) and leaves `final`,
    and every folder written before it, as it was; a full disk is a `WriteError`.
    """
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    with writing(final, then):
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            fill(tmp)
            for path in tmp.rglob("*"):
                if path.is_file():
                    _fsync_file(path)
            fsync_dir(tmp)
        except Exception:  # a failed write gives its space back (a crash's is removed by the next save)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
    write_text(path, json.dumps(data, indent=2) + "\n")
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
