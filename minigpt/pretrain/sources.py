"""The inputs of a preparation: which files, their hashes, and their text read in pieces.

Text files are streamed in blocks of `chunk_bytes` and cut where GPT-2's tokenizer would
cut anyway (`_safe_cut`); each JSONL record is one piece. Every piece knows its split:
the validation split is the last `val_fraction` of the input bytes, taken in the order
the inputs are given (a text file is cut at that byte, moved forward to a character
boundary; JSONL at the next record). Errors name the file, the line and the byte offset.
"""
from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from minigpt.pretrain.config import PrepareConfig


@dataclass(frozen=True)
class Source:
    """One input file."""

    path: Path
    kind: str  # "text" or "jsonl"
    size: int
    start: int  # offset of this file in the concatenated input


@dataclass(frozen=True)
class Piece:
    """A stretch of one input's text, all in one split."""

    split: str
    text: str
    doc_end: bool  # a document ends after this text
    nbytes: int  # input bytes it stands for (progress)
    path: Path


def find_sources(inputs: tuple[str, ...]) -> list[Source]:
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
        sources.append(Source(path.resolve(), kind, size, start))
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


def source_entries(sources: list[Source]) -> list[dict]:
    return [{"path": str(s.path), "kind": s.kind, "bytes": s.size, "blake2b": source_digest(s.path)}
            for s in sources]


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


def read_text(source: Source, split_at: int, config: PrepareConfig) -> Iterator[Piece]:
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
                yield Piece("train", pending + head, False, pending_bytes + cut, source.path)
                pending, pending_bytes, split = "", 0, "val"
                offset, block = offset + cut, block[cut:]
            final = offset + len(block) >= source.size
            if not block and not final:
                raise ValueError(f"{source.path} shrank while it was being read")
            pending += _decode(decoder, block, final, source.path, offset)
            pending_bytes += len(block)
            offset += len(block)
            if final:
                yield Piece(split, pending, True, pending_bytes, source.path)
                return
            cut = _safe_cut(pending)
            if cut == 0 and len(pending) < 8 * config.chunk_bytes:
                continue  # a very long line: keep reading until a safe cut or a limit
            cut = cut or len(pending)
            yield Piece(split, pending[:cut], False, pending_bytes, source.path)
            pending, pending_bytes = pending[cut:], 0


def read_jsonl(source: Source, split_at: int, config: PrepareConfig) -> Iterator[Piece]:
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
            yield Piece(split, text, True, len(raw), source.path)
    if records == 0:
        raise ValueError(f"{source.path} holds no JSON records (only blank lines)")


def pieces(sources: list[Source], split_at: int, config: PrepareConfig) -> Iterator[Piece]:
    for source in sources:
        reader = read_jsonl if source.kind == "jsonl" else read_text
        yield from reader(source, split_at, config)
