"""The format of a prepared folder's meta.json, shared by the writer (`prepare`) and the
reader (`dataset`), so neither imports the other."""
from __future__ import annotations

from pathlib import Path

from minigpt.files import read_json

FORMAT = "minigpt-tokens"
VERSION = 1
SPLITS = ("train", "val")
KEYS = ("tokenizer", "vocab_size", "dtype", "splits")
"""The keys every reader of meta.json uses."""
PREPARE_AGAIN = "re-run `minigpt prepare` on the data to write it afresh"


def read_metadata(folder: str | Path) -> dict:
    """The meta.json of a folder written by `minigpt prepare`, checked for format and keys."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a prepared dataset (no meta.json); run `minigpt prepare` on it")
    meta = read_json(path, "prepared-data metadata", keys=("format", "version", *KEYS), fix=PREPARE_AGAIN)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
            f"{FORMAT!r} version {VERSION}; {PREPARE_AGAIN}"
        )
    return meta
