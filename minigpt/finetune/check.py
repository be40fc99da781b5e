"""`minigpt finetune check`: check a prompt/completion file before fine-tuning, and write a
cleaned JSONL copy.

In the spirit of OpenAI's `fine_tunes.prepare_data`: the file may be CSV, TSV, a JSON
array of objects or JSONL (read by `minigpt.finetune.records`, so a file that cannot be
read as a table is an error naming its line), with the prompt and completion in columns
chosen by name. Each row is checked for: bad JSON, missing fields, extra fields,
non-string or empty values, duplicates, and a length beyond the model's context. Across
the file it reports the prefix all prompts (completions) share, looks for a common
separator at the end of prompts (it tells the model where the prompt stops and the answer
starts), for completions that start with whitespace (prompt and completion are tokenized
apart, and GPT-2's BPE attaches a leading space to the following word), and for a common
stop sequence at the end of completions (so generation knows when to stop).

Findings are of three kinds: errors (rows training would refuse: bad JSON, a missing or
non-string field, an empty completion, too long), warnings (rows training accepts but that
--fix changes or drops: duplicates, a missing separator, ...), and notes (facts, nothing to
fix). `--fix` never drops data silently: every dropped row is reported with its line
number and the reason, and every change applied to the kept rows is listed.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from minigpt.files import write_text
from minigpt.finetune.records import read_records
from minigpt.typed import check_count

FIELDS = ("prompt", "completion")
"""The fields of the cleaned JSONL that --fix writes (and the default column names)."""
SEPARATOR_CANDIDATES = ("\n\n###\n\n", " ->", "\n\n===\n\n", "\n\n&&&\n\n")
STOP_CANDIDATES = ("\n", " END", " ###", " ***", " +++", " &&&")


@dataclass(frozen=True)
class Row:
    prompt: str
    completion: str
    line: int
    extra: tuple[str, ...] = ()
    """Names of fields other than the prompt and completion columns."""


@dataclass(frozen=True)
class Dropped:
    line: int
    reason: str
    error: bool = True
    """True for a row training would refuse; False for one it accepts (a duplicate)."""


@dataclass
class CheckReport:
    path: Path
    rows_read: int = 0
    kept: list[Row] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """Problems with the kept rows, each with the fix that --fix applies."""
    notes: list[str] = field(default_factory=list)
    """Findings that need no fix (the separator all prompts share, a common prefix)."""
    fixes: list[str] = field(default_factory=list)
    """What --fix changed (filled only when fixing)."""
    separator: str | None = None
    """The common prompt ending found, or the one suggested."""
    stop: str | None = None
    """The common completion ending found, or the one suggested."""
    written: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.dropped and not self.warnings

    @property
    def errors(self) -> list[Dropped]:
        """Rows that training would refuse (the CLI exits 1 on them unless --fix wrote a copy)."""
        return [d for d in self.dropped if d.error]

    def format(self) -> str:
        duplicates = len(self.dropped) - len(self.errors)
        lines = [f"{self.path}: {self.rows_read} rows read, {len(self.kept)} usable, {len(self.dropped)} to drop "
                 f"({len(self.errors)} unusable, {duplicates} duplicates)"]
        if self.dropped:
            lines.append("rows to drop:" if self.written is None else "dropped rows:")
            lines += [f"  line {d.line}: {d.reason}" for d in self.dropped]
        if self.warnings:
            lines.append("warnings:")
            lines += [f"  - {w}" for w in self.warnings]
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {n}" for n in self.notes]
        if self.separator is not None:
            lines.append(f"separator (end of every prompt; add it at inference): {self.separator!r}")
            lines.append(f"stop sequence (end of every completion; pass as --stop): {self.stop!r}")
        if self.fixes:
            lines.append("fixes applied:")
            lines += [f"  - {f}" for f in self.fixes]
        if self.written is not None:
            lines.append(f"wrote {len(self.kept)} rows to {self.written}")
        elif not self.ok:
            lines.append("run again with --fix (and --out FILE.jsonl) to write a cleaned copy")
        else:
            lines.append("no problems found")
        return "\n".join(lines)


def _excerpt(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def parse_rows(path: str | Path, *, prompt_column: str = "prompt", completion_column: str = "completion",
               encoding: str = "utf-8", fmt: str | None = None) -> tuple[list[Row], list[Dropped], int]:
    """(usable rows, dropped rows with reasons, records read) of a CSV/TSV/JSON/JSONL file
    (read by `minigpt.finetune.records.read_records`, whose errors it raises).

    A row is dropped when it is not a JSON object, lacks the prompt or completion field,
    has a value that is not a string, or has an empty completion. A column that no row has
    at all is an error listing the columns found.
    """
    path = Path(path)
    columns = (prompt_column, completion_column)
    table = read_records(path, fmt, encoding)
    table.require_columns(columns, "--prompt-column/--completion-column (prompt_column=, completion_column=)")
    rows: list[Row] = []
    dropped = [Dropped(b.line, b.reason) for b in table.bad]
    for record in table.records:
        obj = record.values
        missing = [k for k in columns if k not in obj]
        if missing:
            dropped.append(Dropped(record.line, f"missing field {' and '.join(map(repr, missing))}"
                                                f" (fields present: {sorted(obj)})"))
            continue
        wrong = [f"{k} is {type(obj[k]).__name__}" for k in columns if not isinstance(obj[k], str)]
        if wrong:
            dropped.append(Dropped(record.line, f"values must be strings: {', '.join(wrong)}"))
            continue
        if not obj[completion_column].strip():
            dropped.append(Dropped(record.line, "empty completion"))
            continue
        extra = tuple(sorted(k for k in obj if k not in columns))
        rows.append(Row(obj[prompt_column], obj[completion_column], record.line, extra))
    return rows, sorted(dropped, key=lambda d: d.line), len(table.records) + len(table.bad)


def common_suffix(texts: Sequence[str]) -> str:
    """The ending all texts share, or "" when it is only letters and digits: a shared last
    letter ("title", "one") is a coincidence, not a separator."""
    suffix = os.path.commonprefix([t[::-1] for t in texts])[::-1]
    return suffix if any(not c.isalnum() for c in suffix) else ""


SENTENCE_END = frozenset(".!?\u2026\"')]\u201d\u2019")
"""Characters that end sentences: an ending made only of these is language, not a marker."""


def shared_ending(texts: Sequence[str]) -> tuple[str, list[int]]:
    """(the ending most texts share, indices of the texts that lack it).

    The ending all texts share when there is one. Otherwise the common ending of the
    largest group of texts with the same last character, when that group is more than half
    of them and the ending is more than sentence punctuation: a file whose rows all end in
    " ->" but one keeps " ->" as its separator, and only that one row needs it (appending a
    new separator to every row would give the others two), while completions that mostly
    end in "." have no stop sequence (adding "." to the rest would change their text).
    ("", []) when no ending qualifies.
    """
    full = common_suffix(texts)
    if full or len(texts) < 2:
        return full, []
    groups: dict[str, list[str]] = {}
    for t in texts:
        if t:
            groups.setdefault(t[-1], []).append(t)
    largest = max(groups.values(), key=len, default=[])
    ending = common_suffix(largest) if 2 * len(largest) > len(texts) else ""
    ending = ending.lstrip("".join(SENTENCE_END))  # ".\n" -> "\n": the period is the text's own
    if not ending or ending.strip() and set(ending.strip()) <= SENTENCE_END:
        return "", []
    return ending, [i for i, t in enumerate(texts) if not t.endswith(ending)]


def common_prefix(texts: Sequence[str]) -> str:
    """The start all texts share (empty for fewer than two texts, or only whitespace)."""
    prefix = os.path.commonprefix(list(texts)) if len(texts) > 1 else ""
    return prefix if prefix.strip() else ""


def _pick(candidates: Sequence[str], texts: Sequence[str]) -> str:
    """The first candidate that appears in none of the texts (so it is unambiguous)."""
    for c in candidates:
        if not any(c in t for t in texts):
            return c
    return candidates[-1]


def _ending(report: CheckReport, texts: Sequence[str], lines: Sequence[int], what: str,
            candidates: Sequence[str], why: str) -> tuple[str, set[int]]:
    """Find (or suggest) the shared ending of prompts or completions; return it and the
    lines of the rows that need it appended. Adds the finding to the report."""
    ending, lacking = shared_ending(texts)
    if ending and not lacking:
        report.notes.append(f"all {what}s end with {ending!r}")
        return ending, set()
    if ending:
        missing = [lines[i] for i in lacking]
        report.warnings.append(
            f"{len(texts) - len(missing)} of {len(texts)} {what}s end with {ending!r}; {len(missing)} do not "
            f"(lines {_lines(missing)}) (--fix appends {ending!r} to those)")
        return ending, set(missing)
    ending = _pick(candidates, texts)
    report.warnings.append(f"{what}s do not end with a common {why} (--fix appends {ending!r})")
    return ending, set(lines)


def check_prompt_completion(path: str | Path, tokenizer=None, block_size: int | None = None,
                            fix: bool = False, out: str | Path | None = None, *,
                            prompt_column: str = "prompt", completion_column: str = "completion",
                            encoding: str = "utf-8", fmt: str | None = None) -> CheckReport:
    """Check a prompt/completion file (CSV, TSV, JSON array or JSONL); with `fix`, write a
    cleaned JSONL copy with the fields "prompt" and "completion".

    tokenizer + block_size enable the length check: prompt + completion + eos must fit in
    block_size + 1 tokens (one training row). The cleaned copy goes to `out`, by default
    `<name>.fixed.jsonl` in the current directory (the input's folder may be read-only).
    Returns the report (see `CheckReport.format`). Raises ValueError for a file that
    cannot be read as a table (see `minigpt.finetune.records`) or a missing column.
    """
    path = Path(path)
    rows, dropped, read = parse_rows(path, prompt_column=prompt_column, completion_column=completion_column,
                                     encoding=encoding, fmt=fmt)
    report = CheckReport(path, rows_read=read, dropped=dropped)

    # Duplicates: keep the first occurrence of each (prompt, completion) pair.
    seen: dict[tuple[str, str], int] = {}
    unique = []
    for r in rows:
        key = (r.prompt, r.completion)
        if key in seen:
            dropped.append(Dropped(r.line, f"duplicate of line {seen[key]}", error=False))
        else:
            seen[key] = r.line
            unique.append(r)
    rows = unique

    extra = sorted({k for r in rows for k in r.extra})
    if extra:
        n = sum(bool(r.extra) for r in rows)
        report.warnings.append(f"{n} rows have fields other than {prompt_column}/{completion_column}: {extra}; "
                               f"they are ignored in training (--fix removes them)")
    empty_prompts = [r.line for r in rows if not r.prompt.strip()]
    if empty_prompts:
        report.warnings.append(f"{len(empty_prompts)} rows have an empty prompt (lines {_lines(empty_prompts)}); "
                               f"kept, as unconditional examples")

    needs_sep: set[int] = set()
    needs_stop: set[int] = set()
    no_space: list[int] = []
    if rows:
        prompts, completions, lines = [r.prompt for r in rows], [r.completion for r in rows], [r.line for r in rows]
        for texts, what in ((prompts, "prompt"), (completions, "completion")):
            prefix = common_prefix(texts)
            if prefix:
                report.notes.append(f"all {what}s start with {prefix!r}; a {what} needs only what varies, so "
                                    f"consider removing it (and from {what}s at inference)")
        report.separator, needs_sep = _ending(
            report, prompts, lines, "prompt", SEPARATOR_CANDIDATES,
            "separator; one marks where the prompt stops and the completion starts (use the same at inference)")
        no_space = [r.line for r in rows if not r.completion[:1].isspace()]
        if no_space:
            report.warnings.append(
                f"{len(no_space)} completions do not start with whitespace (lines {_lines(no_space)}); "
                f"GPT-2's tokens carry their leading space, so this tokenizes better (--fix prepends ' ')")
        report.stop, needs_stop = _ending(
            report, completions, lines, "completion", STOP_CANDIDATES,
            "stop sequence; pass it as --stop when sampling. Training also appends eos, which is enough "
            "for minigpt")

    if fix and rows:
        rows = [replace(r, extra=(),
                        prompt=r.prompt + (report.separator if r.line in needs_sep else ""),
                        completion=(r.completion if r.completion[:1].isspace() else " " + r.completion)
                        + (report.stop if r.line in needs_stop else ""))
                for r in rows]
        if extra:
            report.fixes.append(f"removed the fields {extra}")
        if needs_sep:
            report.fixes.append(f"appended the separator {report.separator!r} to {_which(needs_sep, rows, 'prompt')}")
        if no_space:
            report.fixes.append(f"prepended ' ' to {_which(set(no_space), rows, 'completion')} (those that did "
                                f"not start with whitespace)")
        if needs_stop:
            report.fixes.append(f"appended the stop sequence {report.stop!r} to "
                                f"{_which(needs_stop, rows, 'completion')}")
        if (prompt_column, completion_column) != FIELDS:
            report.fixes.append(f"wrote the columns {prompt_column!r}/{completion_column!r} as 'prompt'/'completion'")

    if tokenizer is not None and block_size is not None:
        limit = block_size + 1
        eos = 1 if tokenizer.eos_id is not None else 0
        fitting = []
        for r in rows:
            n = len(tokenizer.encode(r.prompt)) + len(tokenizer.encode(r.completion)) + eos
            if n > limit:
                dropped.append(Dropped(r.line, f"too long: {n} tokens > block_size + 1 = {limit} "
                                               f"(prompt {_excerpt(r.prompt)})"))
            else:
                fitting.append(r)
        rows = fitting

    report.dropped = sorted(dropped, key=lambda d: d.line)
    report.kept = rows
    if fix:
        target = Path(out) if out is not None else Path.cwd() / (path.stem + ".fixed.jsonl")
        if target.resolve() == path.resolve():
            raise ValueError(f"--fix would overwrite the input {path}; choose another output path with --out")
        write_text(target, "".join(json.dumps({"prompt": r.prompt, "completion": r.completion}, ensure_ascii=False)
                                   + "\n" for r in rows), "free space (or give another --out), then run it again")
        report.written = target
    return report


def _which(lines: set[int], rows: Sequence[Row], what: str) -> str:
    """"every prompt", or "2 prompts (lines 3, 9)": a fix names each row it changes."""
    changed = [r.line for r in rows if r.line in lines]
    if len(changed) == len(rows):
        return f"every {what}"
    s = "s" if len(changed) > 1 else ""
    return f"{len(changed)} {what}{s} (line{s} {', '.join(map(str, changed))})"


def _lines(numbers: Sequence[int], n: int = 8) -> str:
    shown = ", ".join(map(str, numbers[:n]))
    return shown + (f", ... ({len(numbers)} in all)" if len(numbers) > n else "")


def check_file(path: str | Path, *, model: str | Path | None = None, block_size: int | None = None,
               fix: bool = False, out: str | Path | None = None, prompt_column: str = "prompt",
               completion_column: str = "completion", encoding: str = "utf-8") -> CheckReport:
    """`check_prompt_completion` with the tokenizer and context of a model folder (or
    GPT-2's tokenizer and `block_size`, 1024 by default, when no model is given)."""
    from minigpt.tokenizer import Tokenizer, load_tokenizer

    if block_size is not None:
        check_count("block_size", block_size, 1, "leave --block-size out for the model's (or 1024)")
    if model is not None:
        from minigpt.weights import read_config

        _, config = read_config(model)
        tokenizer, block_size = load_tokenizer(model), block_size or config.block_size
    else:
        tokenizer, block_size = Tokenizer(), block_size or 1024
    return check_prompt_completion(path, tokenizer, block_size, fix=fix, out=out, prompt_column=prompt_column,
                                   completion_column=completion_column, encoding=encoding)
