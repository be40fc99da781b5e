"""The format of a prepared folder's meta.json, shared by the writer (`prepare`) and the
reader (`dataset`), so neither imports the other."""
from __future__ import annotations

import json
from pathlib import Path

FORMAT = "minigpt-tokens"
VERSION = 1
SPLITS = ("train", "val")


def read_metadata(folder: str | Path) -> dict:
    """The meta.json of a folder written by `minigpt prepare`, checked for format and keys."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a prepared dataset (no meta.json); run `minigpt prepare` on it")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
            f"{FORMAT!r} version {VERSION}; re-run `minigpt prepare`"
        )
    missing = [k for k in ("tokenizer", "vocab_size", "dtype", "splits") if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks {missing}; re-run `minigpt prepare`")
    return meta
