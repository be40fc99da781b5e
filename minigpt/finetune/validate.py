"""Check a prompt/completion JSONL file before fine-tuning, and write a cleaned copy.

In the spirit of OpenAI's `fine_tunes.prepare_data` checker. Each row is checked for:
bad JSON, missing fields, extra fields, non-string or empty values, duplicates, and a
length beyond the model's context. Across the file it looks for a common separator at the
end of prompts (it tells the model where the prompt stops and the answer starts), for
completions that start with whitespace (prompt and completion are tokenized apart, and
GPT-2's BPE attaches a leading space to the following word), and for a common stop
sequence at the end of completions (so generation knows when to stop).

`--fix` never drops data silently: every dropped row is reported with its line number and
the reason, and every change applied to the kept rows is listed.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

FIELDS = ("prompt", "completion")
SEPARATOR_CANDIDATES = ("\n\n###\n\n", " ->", "\n\n===\n\n", "\n\n&&&\n\n")
STOP_CANDIDATES = ("\n", " END", " ###", " ***", " +++", " &&&")


@dataclass(frozen=True)
class Row:
    prompt: str
    completion: str
    line: int
    extra: tuple[str, ...] = ()
    """Names of fields other than prompt and completion."""


@dataclass(frozen=True)
class Dropped:
    line: int
    reason: str


@dataclass
class CheckReport:
    path: Path
    rows_read: int = 0
    kept: list[Row] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """Problems with the kept rows, each with the fix that --fix applies."""
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

    def format(self) -> str:
        lines = [f"{self.path}: {self.rows_read} rows read, {len(self.kept)} usable, {len(self.dropped)} to drop"]
        if self.dropped:
            lines.append("rows to drop:" if self.written is None else "dropped rows:")
            lines += [f"  line {d.line}: {d.reason}" for d in self.dropped]
        if self.warnings:
            lines.append("warnings:")
            lines += [f"  - {w}" for w in self.warnings]
        if self.fixes:
            lines.append("fixes applied:")
            lines += [f"  - {f}" for f in self.fixes]
        if self.written is not None:
            lines.append(f"wrote {len(self.kept)} rows to {self.written}")
        elif not self.ok:
            lines.append("run again with --fix to write a cleaned copy")
        else:
            lines.append("no problems found")
        return "\n".join(lines)


def _excerpt(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def parse_rows(path: str | Path) -> tuple[list[Row], list[Dropped], int]:
    """(usable rows, dropped rows with reasons, lines read) of a JSONL file.

    A row is dropped when it is not a JSON object, lacks prompt or completion, has a
    value that is not a string, or has an empty completion. Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    rows, dropped, read = [], [], 0
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            read += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                dropped.append(Dropped(line_no, f"not valid JSON ({err.msg} at column {err.colno})"))
                continue
            if not isinstance(obj, dict):
                dropped.append(Dropped(line_no, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            missing = [k for k in FIELDS if k not in obj]
            if missing:
                dropped.append(Dropped(line_no, f"missing field {' and '.join(map(repr, missing))}"
                                                f" (fields present: {sorted(obj)})"))
                continue
            wrong = [f"{k} is {type(obj[k]).__name__}" for k in FIELDS if not isinstance(obj[k], str)]
            if wrong:
                dropped.append(Dropped(line_no, f"values must be strings: {', '.join(wrong)}"))
                continue
            if not obj["completion"].strip():
                dropped.append(Dropped(line_no, "empty completion"))
                continue
            extra = tuple(sorted(k for k in obj if k not in FIELDS))
            rows.append(Row(obj["prompt"], obj["completion"], line_no, extra))
    return rows, dropped, read


def common_suffix(texts: Sequence[str]) -> str:
    """The ending all texts share, or "" when it is only letters and digits: a shared last
    letter ("title", "one") is a coincidence, not a separator."""
    suffix = os.path.commonprefix([t[::-1] for t in texts])[::-1]
    return suffix if any(not c.isalnum() for c in suffix) else ""


def _pick(candidates: Sequence[str], texts: Sequence[str]) -> str:
    """The first candidate that appears in none of the texts (so it is unambiguous)."""
    for c in candidates:
        if not any(c in t for t in texts):
            return c
    return candidates[-1]


def check_prompt_completion(path: str | Path, tokenizer=None, block_size: int | None = None,
                            fix: bool = False, out: str | Path | None = None) -> CheckReport:
    """Check a prompt/completion JSONL file; with `fix`, write a cleaned copy.

    tokenizer + block_size enable the length check: prompt + completion + eos must fit in
    block_size + 1 tokens (one training row). The cleaned copy goes to `out`, by default
    `<name>.fixed.jsonl` beside the input. Returns the report (see `CheckReport.format`).
    """
    path = Path(path)
    rows, dropped, read = parse_rows(path)
    report = CheckReport(path, rows_read=read, dropped=dropped)

    # Duplicates: keep the first occurrence of each (prompt, completion) pair.
    seen: dict[tuple[str, str], int] = {}
    unique = []
    for r in rows:
        key = (r.prompt, r.completion)
        if key in seen:
            dropped.append(Dropped(r.line, f"duplicate of line {seen[key]}"))
        else:
            seen[key] = r.line
            unique.append(r)
    rows = unique

    extra = sorted({k for r in rows for k in r.extra})
    if extra:
        n = sum(bool(r.extra) for r in rows)
        report.warnings.append(f"{n} rows have fields other than prompt/completion: {extra}; "
                               f"they are ignored in training (--fix removes them)")
    empty_prompts = [r.line for r in rows if not r.prompt.strip()]
    if empty_prompts:
        report.warnings.append(f"{len(empty_prompts)} rows have an empty prompt (lines {_lines(empty_prompts)}); "
                               f"kept, as unconditional examples")

    need_sep = need_stop = False
    no_space: list[int] = []
    if rows:
        prompts = [r.prompt for r in rows]
        report.separator = common_suffix(prompts)
        if not report.separator:
            need_sep = True
            report.separator = _pick(SEPARATOR_CANDIDATES, prompts)
            report.warnings.append(
                f"prompts do not end with a common separator; one marks where the prompt stops and "
                f"the completion starts (--fix appends {report.separator!r}; use the same at inference)")
        no_space = [r.line for r in rows if not r.completion[:1].isspace()]
        if no_space:
            report.warnings.append(
                f"{len(no_space)} completions do not start with whitespace (lines {_lines(no_space)}); "
                f"GPT-2's tokens carry their leading space, so this tokenizes better (--fix prepends ' ')")
        completions = [r.completion for r in rows]
        report.stop = common_suffix(completions)
        if not report.stop:
            need_stop = True
            report.stop = _pick(STOP_CANDIDATES, completions)
            report.warnings.append(
                f"completions do not end with a common stop sequence (--fix appends {report.stop!r}; "
                f"pass it as --stop when sampling). Training also appends eos, which is enough for minigpt")

    if fix and rows:
        sep = report.separator if need_sep else ""
        stop = report.stop if need_stop else ""
        rows = [replace(r, prompt=r.prompt + sep, extra=(),
                        completion=(r.completion if r.completion[:1].isspace() else " " + r.completion) + stop)
                for r in rows]
        if extra:
            report.fixes.append(f"removed the fields {extra}")
        if need_sep:
            report.fixes.append(f"appended the separator {sep!r} to every prompt")
        if no_space:
            report.fixes.append(f"prepended ' ' to {len(no_space)} completions that did not start with whitespace")
        if need_stop:
            report.fixes.append(f"appended the stop sequence {stop!r} to every completion")

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
        target = Path(out) if out is not None else path.with_name(path.stem + ".fixed.jsonl")
        if target.resolve() == path.resolve():
            raise ValueError(f"--fix would overwrite the input {path}; choose another output path")
        with target.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"prompt": r.prompt, "completion": r.completion}, ensure_ascii=False) + "\n")
        report.written = target
    return report


def _lines(numbers: Sequence[int], n: int = 8) -> str:
    shown = ", ".join(map(str, numbers[:n]))
    return shown + (f", ... ({len(numbers)} in all)" if len(numbers) > n else "")


def check_file(path: str | Path, *, model: str | Path | None = None, block_size: int | None = None,
               fix: bool = False, out: str | Path | None = None) -> CheckReport:
    """`check_prompt_completion` with the tokenizer and context of a model folder (or
    GPT-2's tokenizer and `block_size`, 1024 by default, when no model is given)."""
    from minigpt.tokenizer import Tokenizer, load_tokenizer

    if model is not None:
        from minigpt.weights import read_config

        _, config = read_config(model)
        tokenizer, block_size = load_tokenizer(model), block_size or config.block_size
    else:
        tokenizer, block_size = Tokenizer(), block_size or 1024
    return check_prompt_completion(path, tokenizer, block_size, fix=fix, out=out)
