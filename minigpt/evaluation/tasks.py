"""Task files: plain JSONL, one example per line; the type is read from the fields.

- multiple choice: {"context": str, "choices": [str, ...], "label": int}; HellaSwag's own
  rows {"ctx": str, "endings": [str, ...], "label": int or "0".."3"} are read as is;
- cloze / last word (LAMBADA): {"text": str}; the model predicts the text's last word;
- free-form: {"prompt": str, "completion": str}; a greedy completion is compared with it.

Other fields are kept out of the way (HellaSwag rows carry many). Every problem is a
ValueError naming the file, the line, the field and the fix.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from minigpt.files import existing_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MultipleChoice:
    context: str
    choices: tuple[str, ...]
    label: int
    line: int = 0
    """Line in the source file, for messages and the per-example output."""


@dataclass(frozen=True)
class Cloze:
    text: str
    line: int = 0

    @property
    def context(self) -> str:
        """The text up to its last word (without the space before it)."""
        return self.text.rsplit(" ", 1)[0]

    @property
    def target(self) -> str:
        """The last word with its leading space, as LAMBADA is scored (Radford et al. 2019)."""
        return " " + self.text.rsplit(" ", 1)[1]


@dataclass(frozen=True)
class FreeForm:
    prompt: str
    completion: str
    line: int = 0


Example = MultipleChoice | Cloze | FreeForm
KINDS = {MultipleChoice: "multiple_choice", Cloze: "cloze", FreeForm: "free_form"}


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    """'multiple_choice', 'cloze' or 'free_form'."""
    examples: tuple[Example, ...]
    path: str = ""


def _text(path: Path, line: int, row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{path}, line {line}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def parse_example(row: dict, path: Path, line: int) -> Example:
    """One JSON object as an example; the fields decide its type (see the module docstring)."""
    if not isinstance(row, dict):
        raise ValueError(f"{path}, line {line}: expected a JSON object, got {type(row).__name__}")
    if "ctx" in row and "endings" in row:  # HellaSwag as distributed
        row = {"context": row["ctx"], "choices": row["endings"], "label": row.get("label")}
    if "context" in row or "choices" in row:
        missing = [k for k in ("context", "choices", "label") if k not in row]
        if missing:
            raise ValueError(f"{path}, line {line}: a multiple-choice row needs fields context, choices and "
                             f"label; {missing} missing")
        choices = row["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{path}, line {line}: field 'choices' must be a list of at least two non-empty "
                             f"strings, got {choices!r}")
        label = row["label"]
        if isinstance(label, str) and label.strip().isdigit():  # HellaSwag stores "0".."3"
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise ValueError(f"{path}, line {line}: field 'label' must be the index of the right choice, an "
                             f"integer in 0..{len(choices) - 1}; got {label!r}")
        context = row["context"]
        if not isinstance(context, str):
            raise ValueError(f"{path}, line {line}: field 'context' must be a string, got {context!r}")
        return MultipleChoice(context, tuple(choices), label, line)
    if "prompt" in row or "completion" in row:
        missing = [k for k in ("prompt", "completion") if k not in row]
        if missing:
            raise ValueError(f"{path}, line {line}: a free-form row needs fields prompt and completion; "
                             f"{missing} missing")
        return FreeForm(_text(path, line, row, "prompt"), _text(path, line, row, "completion"), line)
    if "text" in row:
        text = _text(path, line, row, "text").rstrip()
        if " " not in text.strip():
            raise ValueError(f"{path}, line {line}: a cloze 'text' needs at least two words (the last one is "
                             f"predicted from the rest); got {text!r}")
        return Cloze(text, line)
    raise ValueError(f"{path}, line {line}: cannot tell the task type from fields {sorted(row)}; use "
                     f"context/choices/label (multiple choice), ctx/endings/label (HellaSwag), text (cloze) "
                     f"or prompt/completion (free-form)")


def read_examples(path: str | Path) -> list[Example]:
    """Every example of a JSONL task file, all of one type."""
    path = existing_file(path, "task file")
    examples: list[Example] = []
    raw_lines = path.read_bytes().splitlines()
    for line, data in enumerate(raw_lines, 1):
        if line == 1 and data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM some editors write is not JSON
            data = data[3:]
        try:
            raw = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}, line {line}: byte {data[err.start:err.start + 1]!r} at column {err.start + 1} "
                             f"is not UTF-8 ({err.reason}); save the file as UTF-8") from None
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {line}: not valid JSON ({err.msg}); each line must be one "
                             f"JSON object") from None
        example = parse_example(row, path, line)
        if examples and type(example) is not type(examples[0]):
            raise ValueError(f"{path}, line {line}: a {KINDS[type(example)]} row in a "
                             f"{KINDS[type(examples[0])]} file (line {examples[0].line}); one type per file")
        examples.append(example)
    if not examples:
        raise ValueError(f"{path} holds no examples; each line must be one JSON object, e.g. "
                         f'{{"context": "...", "choices": ["...", "..."], "label": 0}}')
    _warn_repeated_choices(path, examples)
    return examples


def _warn_repeated_choices(path: Path, examples: list[Example]) -> None:
    """Identical choices get identical scores and ties go to the first (`metrics.argmax`), so
    an item whose label is a later copy is always scored wrong: say which items repeat one."""
    repeated = [e for e in examples if isinstance(e, MultipleChoice) and len(set(e.choices)) < len(e.choices)]
    if not repeated:
        return
    first = repeated[0]
    copies = sorted({c for c in first.choices if first.choices.count(c) > 1})
    log.warning("%s: %d of %d items list the same choice twice (line %d repeats %s%s); identical choices score the "
                "same and ties go to the first, so an item whose label is a later copy is always scored wrong. "
                "Make each item's choices distinct", path, len(repeated), len(examples), first.line,
                ", ".join(map(repr, copies)),
                f"; also lines {', '.join(str(e.line) for e in repeated[1:6])}" if len(repeated) > 1 else "")


def read_task(path: str | Path, limit: int | None = None) -> Task:
    """A task file as a Task named after the file; its first `limit` examples when given."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be an integer >= 1; leave --limit out to evaluate every example")
    examples = read_examples(path)
    return Task(Path(path).stem, KINDS[type(examples[0])], tuple(examples[:limit]), str(path))
