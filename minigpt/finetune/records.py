"""Records of a fine-tuning data file: CSV, TSV, a JSON array of objects, or JSONL.

One reader per format, shared by every caller (labeled files for classification and
few-shot, prompt/completion files for completion training, `finetune check`, `evaluate`,
`predict`), so a file means the same thing everywhere. The rules, all checked here:

- The format comes from the suffix: .csv, .tsv, .jsonl; .json is a JSON array of objects
  when its first non-blank character is ``[``, else one object per line (JSONL).
- The file is decoded as a whole with `encoding` (UTF-8 by default; a UTF-8 byte-order
  mark is stripped through the 'utf-8-sig' codec). Bytes that do not decode are an error
  naming the file, the line, the byte offset and the ``--encoding`` flag.
- CSV/TSV: the first row is the header; every row must have exactly as many fields as the
  header. A row with more or fewer is an error naming its line: it is almost always a
  field with an unquoted comma (or tab), and guessing where it belonged would silently
  change the data. Quoted fields may hold commas, quotes and line breaks (stdlib `csv`).
- JSONL / JSON array: a line (element) that is not a JSON object is returned as a bad
  record with its reason, so the checker can drop and list it while the training readers
  refuse the file.

Line numbers are 1-based physical lines of the file: a CSV row's line is where it starts
(the header is line 1), a JSON array element's line is where its ``{`` is.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("csv", "tsv", "json", "jsonl")
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl"}


@dataclass(frozen=True)
class Record:
    line: int
    """Line of the file where the record starts (1-based; a CSV header is line 1)."""
    values: dict
    """Column (field) name -> value; CSV/TSV values are strings, JSON values any JSON type."""


@dataclass(frozen=True)
class BadRecord:
    line: int
    reason: str


@dataclass
class Table:
    """What `read_records` found in a file."""

    path: Path
    format: str
    records: list[Record] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    """JSON lines/elements that are not objects (never CSV rows: those are errors)."""
    header: tuple[str, ...] | None = None
    """CSV/TSV header; None for JSON, whose fields can differ per record."""

    @property
    def columns(self) -> list[str]:
        """Every column name seen: the header, or the union of the records' fields in order."""
        if self.header is not None:
            return list(self.header)
        seen: dict[str, None] = {}
        for r in self.records:
            seen.update(dict.fromkeys(r.values))
        return list(seen)

    def require_columns(self, columns: Sequence[str], flags: str) -> None:
        """ValueError unless every column occurs (in the header, or in some JSON record),
        listing the columns found and the flags that choose others."""
        found = self.columns
        missing = [c for c in columns if c not in found]
        if missing and (self.records or self.header is not None):
            raise ValueError(f"{self.path}: no column {' or '.join(map(repr, missing))}; the file has {found}. "
                             f"Choose the columns with {flags}")


def format_of(path: Path, fmt: str | None = None) -> str:
    """The format named by `fmt`, else by the file's suffix."""
    fmt = fmt or _SUFFIXES.get(path.suffix.lower())
    if fmt not in FORMATS:
        raise ValueError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                         f"name it .csv, .tsv, .json or .jsonl, or pass the format ({', '.join(FORMATS)})")
    return fmt


def decode(path: Path, data: bytes, encoding: str = "utf-8") -> str:
    """`data` (the bytes of `path`) as text; a UTF-8 BOM is dropped. Undecodable bytes are a
    ValueError naming the file, line, byte offset and the --encoding flag."""
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"encoding={encoding!r} is not a codec Python knows; try utf-8, latin-1 or cp1252") from None
    try:
        return data.decode("utf-8-sig" if codec == "utf-8" else encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}: line {line}, byte offset {err.start}: cannot decode {data[err.start:err.end]!r} as "
            f"{encoding} ({err.reason}); re-save the file as UTF-8, or name its encoding with --encoding "
            f"(e.g. --encoding latin-1 or cp1252)") from None


def read_records(path: str | Path, fmt: str | None = None, encoding: str = "utf-8") -> Table:
    """The records of a CSV/TSV/JSON/JSONL file (see the module docstring for the rules).

    Raises FileNotFoundError for a missing file and ValueError, naming the file and the
    line, for undecodable bytes, a CSV row whose field count differs from the header's, a
    CSV without a header or with repeated column names, or JSON that is not an array.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    fmt = format_of(path, fmt)
    text = decode(path, path.read_bytes(), encoding)
    if fmt in ("csv", "tsv"):
        return _read_delimited(path, text, fmt)
    if fmt == "json" and text.lstrip().startswith("["):
        return _read_json_array(path, text)
    return _read_jsonl(path, text, fmt)


def _read_delimited(path: Path, text: str, fmt: str) -> Table:
    delimiter = "," if fmt == "csv" else "\t"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    table = Table(path, fmt)
    try:
        header = next(reader, None)
        while header == []:  # blank lines before the header
            header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty; a {fmt.upper()} file needs a header row naming its columns")
        repeated = sorted({c for c in header if header.count(c) > 1})
        if repeated:
            raise ValueError(f"{path}:{reader.line_num}: the header names {repeated} more than once; "
                             f"column names must be distinct")
        table.header = tuple(header)
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                name = "comma" if fmt == "csv" else "tab"
                raise ValueError(
                    f"{path}:{line}: {len(row)} fields but the header has {len(header)} ({', '.join(header)}): "
                    f"{_shown(row)}. A field that contains a {name}, a quote or a line break must be "
                    f"quoted, e.g. \"a gem of a film, truly\" (double any quote inside it)")
            table.records.append(Record(line, dict(zip(header, row))))
    except csv.Error as err:
        raise ValueError(f"{path}:{reader.line_num}: not valid {fmt.upper()} ({err})") from None
    return table


def _shown(row: list[str], n: int = 120) -> str:
    text = repr(row)
    return text if len(text) <= n else text[:n] + "...]"


def _read_jsonl(path: Path, text: str, fmt: str) -> Table:
    table = Table(path, fmt)
    # Split on "\n" only: str.splitlines would also split inside strings holding U+2028 or
    # U+0085, which json.dumps(ensure_ascii=False) writes unescaped.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            hint = "; a .json file must be a JSON array or one object per line" if fmt == "json" else ""
            table.bad.append(BadRecord(line_no, f"not valid JSON ({err.msg} at column {err.colno}){hint}"))
            continue
        if not isinstance(obj, dict):
            table.bad.append(BadRecord(line_no, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        table.records.append(Record(line_no, obj))
    return table


def _read_json_array(path: Path, text: str) -> Table:
    """Each element decoded by `json.JSONDecoder.raw_decode`, which also gives where it
    starts, so messages can name its line (json.loads of the whole array would not)."""
    table = Table(path, "json")
    decoder = json.JSONDecoder()

    def at(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        return pos

    pos = skip(text.index("[") + 1)
    if pos < len(text) and text[pos] == "]":
        return table
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None
        if isinstance(obj, dict):
            table.records.append(Record(at(pos), obj))
        else:
            table.bad.append(BadRecord(at(pos), f"expected a JSON object, got {type(obj).__name__}"))
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]" and not text[pos + 1:].strip():
            return table
        raise ValueError(f"{path}: line {at(pos)}: expected ',' or the array's closing ']' "
                         f"(a .json file must hold one JSON array of objects)")
