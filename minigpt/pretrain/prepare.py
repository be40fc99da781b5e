"""`minigpt prepare`: tokenize text files, folders of them, or JSONL into binary token shards.

A prepared folder holds:

    meta.json              tokenizer, dtype, token counts, sources (path, bytes, blake2b of the
                           content), and each shard's sha256
    train_000000.bin ...   raw little-endian token ids, uint16 (uint32 when the vocabulary needs it)
    val_000000.bin ...

The input is streamed in blocks of `chunk_bytes`, so a 10 GB corpus is never in memory. A
text file is one document and so is each JSONL record; with GPT-2's tokenizer documents
are separated by ``<|endoftext|>``. The validation split is the last `val_fraction` of the
input bytes, taken in the order the inputs are given: a text file is cut at that byte
(moved forward to a character boundary), JSONL at the next record. On one text file this is
nanoGPT's split (tiny Shakespeare: train is its first 1,003,854 characters). A UTF-8
byte-order mark at the start of a file is dropped ('utf-8-sig').

meta.json is written last, so an interrupted run leaves a folder that the loader refuses.
The inputs are read in `minigpt.pretrain.sources`; the folder's format is `minigpt.pretrain.meta`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from minigpt.files import write_text, writing
from minigpt.pretrain.config import PrepareConfig
from minigpt.pretrain.meta import FORMAT, SPLITS, VERSION, read_metadata
from minigpt.pretrain.sources import Piece, Source, check_outside_inputs, find_sources, pieces, source_entries
from minigpt.tokenizer import CharTokenizer, Tokenizer

logger = logging.getLogger(__name__)

PROGRESS_DELAY_S = 1.0
PREPARE_AGAIN = ("free space (or give another --out), then run the same command again; it starts the "
                 "folder afresh")
"""Seconds of preparing before the progress bar appears."""


def stale_reason(folder: str | Path, config: PrepareConfig) -> str | None:
    """Why the prepared folder cannot stand for `config`'s inputs, or None if it can.

    It must hold a complete preparation (meta.json) of the same files with the same bytes
    (path, size and content hash), the same tokenizer and val_fraction. The content hash,
    not size or modification time, decides: an in-place edit that keeps the size, or a
    different file copied over the old one, is re-prepared.
    """
    try:
        meta = read_metadata(folder)
    except (FileNotFoundError, ValueError) as err:
        return f"no complete preparation there ({err})"
    if meta["tokenizer"]["type"] != config.tokenizer:
        return f"it was prepared with tokenizer {meta['tokenizer']['type']!r}, not {config.tokenizer!r}"
    if meta.get("val_fraction") != config.val_fraction:
        return f"it was prepared with val_fraction={meta.get('val_fraction')}, not {config.val_fraction}"
    old = {s["path"]: s for s in meta.get("sources", [])}
    sources = find_sources(config.inputs)
    if list(old) != [str(s.path) for s in sources]:  # the order decides the split, too
        return f"its sources were {list(old)}, not {[str(s.path) for s in sources]}"
    for source, entry in zip(sources, source_entries(sources)):
        before = old[entry["path"]]
        if "blake2b" not in before:
            return f"it predates content hashes in meta.json, so {source.path} cannot be checked"
        if before["bytes"] != entry["bytes"] or before["blake2b"] != entry["blake2b"]:
            return (f"{source.path} changed since it was prepared ({before['bytes']} -> {entry['bytes']} bytes, "
                    f"content hash {before['blake2b'][:12]} -> {entry['blake2b'][:12]})")
    return None


class _CharEncoder:
    """Characters -> ids through a lookup table over code points (numpy, no Python loop)."""

    def __init__(self, tokenizer: CharTokenizer) -> None:
        self.tokenizer = tokenizer
        codes = [ord(c) for c in tokenizer.chars]
        self.table = np.full(max(codes) + 1, -1, dtype=np.int64)
        self.table[codes] = np.arange(len(codes))

    def __call__(self, piece: Piece) -> np.ndarray:
        codes = np.frombuffer(piece.text.encode("utf-32-le"), dtype=np.uint32)
        known = codes < len(self.table)
        ids = np.where(known, self.table[np.where(known, codes, 0)], -1)
        if (ids < 0).any():
            bad = piece.text[int(np.argmax(ids < 0))]
            raise ValueError(
                f"{piece.path}: character {bad!r} is not in the char tokenizer's alphabet of "
                f"{self.tokenizer.vocab_size} characters; add it to --chars or leave --chars out"
            )
        return ids


def _collect_chars(sources: list[Source], config: PrepareConfig) -> str:
    chars: set[str] = set()
    for piece in pieces(sources, 0, config):
        chars.update(piece.text)
    if not chars:
        raise ValueError("the inputs hold no characters")
    return "".join(sorted(chars))


class _ShardWriter:
    """Appends token ids to numbered shard files of one split, hashing as it writes."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.dtype = dtype.newbyteorder("<")  # the files are little-endian on every machine
        self.shards: list[dict] = []
        self._file = None

    def _open(self) -> None:
        self._name = f"{self.split}_{len(self.shards):06d}.bin"
        self._file = open(self.folder / (self._name + ".tmp"), "wb")
        self._hash = hashlib.sha256()
        self._count = 0

    def _close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.folder / (self._name + ".tmp"), self.folder / self._name)
        self.shards.append({"file": self._name, "tokens": self._count, "sha256": self._hash.hexdigest()})
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        with writing(self.folder, PREPARE_AGAIN):
            self._write(ids)

    def _write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None:
                self._open()
            take = ids[: self.shard_tokens - self._count]
            data = take.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += len(take)
            ids = ids[len(take):]
            if self._count == self.shard_tokens:
                self._close()

    def finish(self) -> dict:
        if self._file is not None:
            with writing(self.folder, PREPARE_AGAIN):
                self._close()
        return {"tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def _batches(pieces: Iterator[Piece], max_bytes: int) -> Iterator[list[Piece]]:
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += piece.nbytes
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def prepare(config: PrepareConfig) -> dict:
    """Tokenize `config.inputs` into shards in `config.out_dir`; return the metadata written.

    Raises FileNotFoundError for a missing input, and ValueError for an empty file, bytes
    that are not UTF-8 (file and byte offset), a JSONL line that is not JSON or lacks the
    text field (line number), or a split that ends up with no tokens.
    """
    check_outside_inputs(config.inputs, config.out_dir, "out_dir")
    sources = find_sources(config.inputs)
    entries = source_entries(sources)  # hashed before reading, so they describe what was read
    total_bytes = sum(s.size for s in sources)
    split_at = int(total_bytes * (1.0 - config.val_fraction))
    if config.tokenizer == "char":
        tokenizer = CharTokenizer(config.chars if config.chars is not None else _collect_chars(sources, config))
        encode_one = _CharEncoder(tokenizer)

        def encode(batch: list[Piece]) -> list[np.ndarray]:
            return [encode_one(p) for p in batch]
    else:
        tokenizer = Tokenizer()
        threads = config.num_workers or os.cpu_count() or 1

        def encode(batch: list[Piece]) -> list[np.ndarray]:
            ids = tokenizer.encode_batch([p.text for p in batch], num_threads=threads)
            return [np.asarray(row, dtype=np.int64) for row in ids]
    eos = (config.tokenizer == "gpt2") if config.eos is None else config.eos
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)

    out = Path(config.out_dir)
    with writing(out, PREPARE_AGAIN):
        out.mkdir(parents=True, exist_ok=True)
    for old in [out / "meta.json", *out.glob("train_*.bin"), *out.glob("val_*.bin"), *out.glob("*.bin.tmp")]:
        old.unlink(missing_ok=True)
    writers = {s: _ShardWriter(out, s, dtype, config.shard_tokens) for s in SPLITS}
    documents = 0
    eos_ids = np.array([tokenizer.eos_id if eos else 0], dtype=np.int64)

    from tqdm import tqdm

    # As the training loop's bar: on a terminal only (disable=None), and only once preparing
    # has taken more than a moment (delay), so a small corpus prepares without a flash.
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", dynamic_ncols=True,
               disable=None if config.progress else True, delay=PROGRESS_DELAY_S)
    tokens, began = 0, time.perf_counter()
    threads = config.num_workers or os.cpu_count() or 1
    for batch in _batches(pieces(sources, split_at, config), config.chunk_bytes * max(1, threads)):
        for piece, ids in zip(batch, encode(batch)):
            writers[piece.split].write(ids)
            tokens += len(ids)
            if piece.doc_end:
                documents += 1
                if eos:
                    writers[piece.split].write(eos_ids)
                    tokens += 1
        bar.update(sum(p.nbytes for p in batch))
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - began, 1e-9):,.0f} tok/s")
    bar.close()

    splits = {s: w.finish() for s, w in writers.items()}
    if splits["train"]["tokens"] == 0:
        raise ValueError(f"the train split is empty; val_fraction={config.val_fraction} leaves nothing to train on")
    if config.val_fraction > 0 and splits["val"]["tokens"] == 0:
        raise ValueError(
            f"the validation split is empty: val_fraction={config.val_fraction} of {total_bytes} bytes "
            f"is less than one document; raise val_fraction"
        )
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": tokenizer.to_dict(),
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "eos_between_documents": eos,
        "val_fraction": config.val_fraction,
        "documents": documents,
        "sources": entries,
        "splits": splits,
    }
    write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n", PREPARE_AGAIN)
    logger.info(
        "prepared %s: %s train + %s val tokens (%s) in %.1fs", out, f"{splits['train']['tokens']:,}",
        f"{splits['val']['tokens']:,}", dtype.name, time.perf_counter() - began,
    )
    return meta
