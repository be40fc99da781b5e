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
"""
from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minigpt.tokenizer import CharTokenizer, Tokenizer
from minigpt.typed import PathStr, check_fields

logger = logging.getLogger(__name__)

FORMAT = "minigpt-tokens"
VERSION = 1
TOKENIZERS = ("gpt2", "char")
ERRORS = ("strict", "replace")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class PrepareConfig:
    """What to tokenize and how."""

    inputs: tuple[PathStr, ...]
    """Text files, folders of them (searched recursively, hidden files skipped), or .jsonl files."""
    out_dir: PathStr
    """Folder that receives meta.json and the shards (earlier shards there are replaced)."""
    tokenizer: str = "gpt2"
    """'gpt2' (tiktoken BPE) or 'char' (one id per character)."""
    chars: str | None = None
    """The char tokenizer's alphabet; None collects it from the inputs (one extra pass)."""
    val_fraction: float = 0.1
    """Share of the input bytes, at the end, that becomes the validation split."""
    text_field: str = "text"
    """The field of each JSONL record that holds its text."""
    errors: str = "strict"
    """Undecodable UTF-8: 'strict' stops with the file and byte offset, 'replace' puts U+FFFD."""
    eos: bool | None = None
    """Put the end-of-text token after every document; None means yes for gpt2 (char has none)."""
    shard_tokens: int = 100_000_000
    """Tokens per shard file, at most."""
    chunk_bytes: int = 1 << 20
    """Bytes read at a time from each file."""
    num_workers: int = 0
    """Tokenizer threads; 0 means one per CPU core."""
    progress: bool = True
    """Show a progress bar with tokens/s."""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, (str, Path)):
            raise ValueError(f"inputs={self.inputs!r} must be a tuple of paths, not one path; "
                             f"write inputs=({str(self.inputs)!r},)")
        check_fields(self)  # every value has its field's type (minigpt.typed); `~` expanded
        if not self.inputs:
            raise ValueError(f"inputs={self.inputs!r} must name at least one file or folder")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer={self.tokenizer!r} is not supported; choose one of {TOKENIZERS}")
        if self.chars is not None and self.tokenizer != "char":
            raise ValueError(f"chars is set but tokenizer={self.tokenizer!r}; chars is for tokenizer='char'")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if self.errors not in ERRORS:
            raise ValueError(f"errors={self.errors!r} must be one of {ERRORS}")
        if self.eos and self.tokenizer == "char":
            raise ValueError("eos=True needs a tokenizer with an end-of-text token; the char tokenizer has none")
        for name in ("shard_tokens", "chunk_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0 (0 means one per core)")


@dataclass(frozen=True)
class _Source:
    path: Path
    kind: str  # "text" or "jsonl"
    size: int
    start: int  # offset of this file in the concatenated input


@dataclass(frozen=True)
class _Piece:
    split: str
    text: str
    doc_end: bool  # a document ends after this text
    nbytes: int  # input bytes it stands for (progress)
    path: Path


def find_sources(inputs: tuple[str, ...]) -> list[_Source]:
    """The files behind `inputs`, in order (a folder's files sorted by path)."""
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise ValueError(f"folder {path} holds no files to tokenize")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    sources, start = [], 0
    for path in files:
        size = path.stat().st_size
        if size == 0:
            raise ValueError(f"input file {path} is empty; remove it from the inputs")
        kind = "jsonl" if path.suffix.lower() == ".jsonl" else "text"
        sources.append(_Source(path.resolve(), kind, size, start))
        start += size
    return sources


def check_outside_inputs(inputs: tuple[str, ...], folder: str | Path, what: str) -> None:
    """Raise ValueError when `folder` (where minigpt writes) is, or is inside, an input folder:
    a folder input is read whole, so the shards, locks and checkpoints written there would
    be tokenized as training text on the next preparation, without a word."""
    target = Path(folder).expanduser().resolve()
    for name in inputs:
        source = Path(name).expanduser()
        if source.is_dir() and (target == source.resolve() or source.resolve() in target.parents):
            raise ValueError(f"{what} {folder} is inside the data folder {name}, whose every file is read as "
                             f"text: minigpt's own files written there would become training data. Choose another "
                             f"{what}, outside {name}")


def source_digest(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """blake2b of a file's bytes, read in 1 MiB chunks (memory stays flat for any size;
    blake2b runs at about 1 GB/s, small beside tokenizing). meta.json records it per
    source, so a prepared folder is reused only for the very bytes it was made from."""
    digest = hashlib.blake2b()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_entries(sources: list[_Source]) -> list[dict]:
    return [{"path": str(s.path), "kind": s.kind, "bytes": s.size, "blake2b": source_digest(s.path)}
            for s in sources]


def stale_reason(folder: str | Path, config: PrepareConfig) -> str | None:
    """Why the prepared folder cannot stand for `config`'s inputs, or None if it can.

    It must hold a complete preparation (meta.json) of the same files with the same bytes
    (path, size and content hash), the same tokenizer and val_fraction. The content hash,
    not size or modification time, decides: an in-place edit that keeps the size, or a
    different file copied over the old one, is re-prepared.
    """
    from minigpt.data.dataset import read_metadata

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
    for source, entry in zip(sources, _source_entries(sources)):
        before = old[entry["path"]]
        if "blake2b" not in before:
            return f"it predates content hashes in meta.json, so {source.path} cannot be checked"
        if before["bytes"] != entry["bytes"] or before["blake2b"] != entry["blake2b"]:
            return (f"{source.path} changed since it was prepared ({before['bytes']} -> {entry['bytes']} bytes, "
                    f"content hash {before['blake2b'][:12]} -> {entry['blake2b'][:12]})")
    return None


def _line_at(path: Path, offset: int, chunk_bytes: int = 1 << 20) -> int:
    """The 1-based line holding byte `offset` of `path` (streamed; for error messages)."""
    lines, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(chunk_bytes, offset - done))
            if not block:
                break
            lines += block.count(b"\n")
            done += len(block)
    return lines


def _decode(decoder, block: bytes, final: bool, path: Path, offset: int) -> str:
    """Decode `block`, read at byte `offset` of `path`; errors name the file and the offset.

    `decoder` is a 'utf-8-sig' incremental decoder: it drops a byte-order mark at the start
    of the file (and only there), and its error positions then count from after the mark.
    """
    buffered, first = decoder.getstate()
    try:
        return decoder.decode(block, final)
    except UnicodeDecodeError as err:
        bom = len(codecs.BOM_UTF8) if first and (buffered + block).startswith(codecs.BOM_UTF8) else 0
        at = offset - len(buffered) + bom + err.start
        raise ValueError(
            f"{path}: line {_line_at(path, at)}, byte offset {at}: cannot decode {err.object[err.start:err.end]!r} as UTF-8 "
            f"({err.reason}); fix the file or pass --errors replace"
        ) from None


def _safe_cut(text: str) -> int:
    """The end of the longest prefix of `text` that GPT-2's BPE tokenizes the same alone as
    inside `text`: just after a newline with a non-space character on both sides (GPT-2's
    split pattern groups runs of whitespace, so a cut inside one would change the tokens).
    0 if there is none."""
    i = text.rfind("\n", 0, len(text) - 1)
    while i > 0 and (text[i - 1].isspace() or text[i + 1].isspace()):
        i = text.rfind("\n", 0, i)
    return i + 1 if i > 0 else 0


def _read_text(source: _Source, split_at: int, config: PrepareConfig) -> Iterator[_Piece]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors=config.errors)
    local_split = split_at - source.start  # val starts at this byte of the file
    split = "train" if local_split > 0 else "val"
    pending, pending_bytes, offset = "", 0, 0
    with open(source.path, "rb") as f:
        while True:
            block = f.read(config.chunk_bytes)
            if split == "train" and offset + len(block) > local_split:
                block += f.read(4)  # a UTF-8 character has at most 4 bytes
                cut = local_split - offset
                while cut < len(block) and block[cut] & 0xC0 == 0x80:  # continuation byte
                    cut += 1
                head = _decode(decoder, block[:cut], False, source.path, offset)
                yield _Piece("train", pending + head, False, pending_bytes + cut, source.path)
                pending, pending_bytes, split = "", 0, "val"
                offset, block = offset + cut, block[cut:]
            final = offset + len(block) >= source.size
            if not block and not final:
                raise ValueError(f"{source.path} shrank while it was being read")
            pending += _decode(decoder, block, final, source.path, offset)
            pending_bytes += len(block)
            offset += len(block)
            if final:
                yield _Piece(split, pending, True, pending_bytes, source.path)
                return
            cut = _safe_cut(pending)
            if cut == 0 and len(pending) < 8 * config.chunk_bytes:
                continue  # a very long line: keep reading until a safe cut or a limit
            cut = cut or len(pending)
            yield _Piece(split, pending[:cut], False, pending_bytes, source.path)
            pending, pending_bytes = pending[cut:], 0


def _read_jsonl(source: _Source, split_at: int, config: PrepareConfig) -> Iterator[_Piece]:
    offset, records = 0, 0
    with open(source.path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:  # 'utf-8-sig' on the first line drops a byte-order mark there
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8", errors=config.errors)
            except UnicodeDecodeError as err:
                bom = len(codecs.BOM_UTF8) if lineno == 1 and raw.startswith(codecs.BOM_UTF8) else 0
                raise ValueError(
                    f"{source.path}: line {lineno}, byte offset {start + bom + err.start}: cannot decode "
                    f"{raw[bom + err.start:bom + err.end]!r} as UTF-8 ({err.reason}); fix the file or pass "
                    f"--errors replace"
                ) from None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{source.path}: line {lineno} is not valid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(record, dict) or config.text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{source.path}: line {lineno} has no {config.text_field!r} field (it has {keys}); "
                    f"choose the field with --text-field"
                )
            text = record[config.text_field]
            if not isinstance(text, str):
                raise ValueError(
                    f"{source.path}: line {lineno}: field {config.text_field!r} is a {type(text).__name__}, not a string"
                )
            records += 1
            split = "train" if source.start + start < split_at else "val"
            yield _Piece(split, text, True, len(raw), source.path)
    if records == 0:
        raise ValueError(f"{source.path} holds no JSON records (only blank lines)")


def _pieces(sources: list[_Source], split_at: int, config: PrepareConfig) -> Iterator[_Piece]:
    for source in sources:
        reader = _read_jsonl if source.kind == "jsonl" else _read_text
        yield from reader(source, split_at, config)


class _CharEncoder:
    """Characters -> ids through a lookup table over code points (numpy, no Python loop)."""

    def __init__(self, tokenizer: CharTokenizer) -> None:
        self.tokenizer = tokenizer
        codes = [ord(c) for c in tokenizer.chars]
        self.table = np.full(max(codes) + 1, -1, dtype=np.int64)
        self.table[codes] = np.arange(len(codes))

    def __call__(self, piece: _Piece) -> np.ndarray:
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


def _collect_chars(sources: list[_Source], config: PrepareConfig) -> str:
    chars: set[str] = set()
    for piece in _pieces(sources, 0, config):
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
            self._close()
        return {"tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def _batches(pieces: Iterator[_Piece], max_bytes: int) -> Iterator[list[_Piece]]:
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
    source_entries = _source_entries(sources)  # hashed before reading, so they describe what was read
    total_bytes = sum(s.size for s in sources)
    split_at = int(total_bytes * (1.0 - config.val_fraction))
    if config.tokenizer == "char":
        tokenizer = CharTokenizer(config.chars if config.chars is not None else _collect_chars(sources, config))
        encode_one = _CharEncoder(tokenizer)

        def encode(batch: list[_Piece]) -> list[np.ndarray]:
            return [encode_one(p) for p in batch]
    else:
        tokenizer = Tokenizer()
        threads = config.num_workers or os.cpu_count() or 1

        def encode(batch: list[_Piece]) -> list[np.ndarray]:
            ids = tokenizer.encode_batch([p.text for p in batch], num_threads=threads)
            return [np.asarray(row, dtype=np.int64) for row in ids]
    eos = (config.tokenizer == "gpt2") if config.eos is None else config.eos
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in [out / "meta.json", *out.glob("train_*.bin"), *out.glob("val_*.bin"), *out.glob("*.bin.tmp")]:
        old.unlink(missing_ok=True)
    writers = {s: _ShardWriter(out, s, dtype, config.shard_tokens) for s in SPLITS}
    documents = 0
    eos_ids = np.array([tokenizer.eos_id if eos else 0], dtype=np.int64)

    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not config.progress)
    tokens, began = 0, time.perf_counter()
    threads = config.num_workers or os.cpu_count() or 1
    for batch in _batches(_pieces(sources, split_at, config), config.chunk_bytes * max(1, threads)):
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
        "sources": source_entries,
        "splits": splits,
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")
    logger.info(
        "prepared %s: %s train + %s val tokens (%s) in %.1fs", out, f"{splits['train']['tokens']:,}",
        f"{splits['val']['tokens']:,}", dtype.name, time.perf_counter() - began,
    )
    return meta
