"""Fine-tuning data: labeled texts, prompt/completion pairs, their tokenization and batches.

Two shapes of example come out of here:
- classification: token ids of a text and a label id; batches are right-padded and carry
  each row's length, so the head can find the last real token;
- completion: the tokens of prompt + completion + eos and a mask that is True where a
  token is a training target. A row's input is tokens[:-1] and its targets are
  tokens[1:], with -100 (ignored by the loss) wherever the target is a prompt token.

`ShuffledBatches` serves both to the training loop: endless batches, reshuffled each epoch
from (seed, epoch), whose position is part of the checkpoint so a resumed run sees the
batches it would have seen.
"""
from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt.files import BadFileError, missing_keys, read_json, write_text
from minigpt.finetune.records import read_records

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Target value the loss skips (`F.cross_entropy`'s ignore_index)."""


# --------------------------------------------------------------------------- labeled text
@dataclass(frozen=True)
class LabeledText:
    text: str
    label: str
    line: int
    """Line (CSV/TSV: row, counting the header as line 1) in the source file, for messages."""


def read_labeled(path: str | Path, text_column: str = "text", label_column: str = "label",
                 fmt: str | None = None, *, encoding: str = "utf-8", merge_label_case: bool = False,
                 known_labels: Sequence[str] = ()) -> list[LabeledText]:
    """Rows of a CSV/TSV file (with a header), a JSON array or a JSONL file, as (text, label)
    pairs (read by `minigpt.finetune.records.read_records`, so a row with the wrong number
    of fields or undecodable bytes is an error naming its line).

    Labels that differ only by case or surrounding whitespace ("Positive", "positive ") are
    an error listing the spellings and their counts, unless `merge_label_case`, which maps
    them to one spelling (see `merge_label_spellings`; `known_labels`, e.g. a model's,
    win). Raises ValueError naming the file and line for a missing column, an empty text
    or label, or a line that is not a JSON object; FileNotFoundError for a missing file.
    """
    path = Path(path)
    table = read_records(path, fmt, encoding)
    table.require_columns((text_column, label_column), "text_column=/label_column= (--text-column/--label-column)")
    if table.bad:
        bad = table.bad[0]
        raise ValueError(f"{path}:{bad.line}: {bad.reason}" + (f" (and {len(table.bad) - 1} more such lines)"
                                                                if len(table.bad) > 1 else ""))
    out = []
    for record in table.records:
        row, line_no = record.values, record.line
        for column in (text_column, label_column):
            if column not in row:
                raise ValueError(f"{path}:{line_no}: no field {column!r}; it has {sorted(row)}")
        text, label = row[text_column], row[label_column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{line_no}: empty {text_column!r}")
        if label is None or not str(label).strip():
            raise ValueError(f"{path}:{line_no}: empty {label_column!r}")
        out.append(LabeledText(text, str(label), line_no))
    if not out:
        raise ValueError(f"{path} holds no rows")
    return merge_label_spellings(out, merge_label_case, known_labels, source=str(path))


def _label_key(label: str) -> str:
    return label.strip().casefold()


def merge_label_spellings(rows: Sequence[LabeledText], merge: bool = False, known: Sequence[str] = (),
                          source: str = "the data") -> list[LabeledText]:
    """Labels as classes: surrounding whitespace is never part of a label, and spellings
    that differ only by case or surrounding whitespace are one class only when asked.

    Why an error by default: "Positive" and "positive" silently becoming two classes
    trains a wrong model, and silently merging could hide a real distinction (or a data
    bug worth seeing). With `merge`, each group takes the spelling in `known` (e.g. the
    training labels, or a model's) when there is one, else its most frequent spelling
    (ties: the first in sorted order), and a warning lists what was merged.
    Raises ValueError naming the spellings and their counts when not merging.
    """
    spellings: dict[str, dict[str, int]] = {}
    for r in rows:
        counts = spellings.setdefault(_label_key(r.label), {})
        counts[r.label] = counts.get(r.label, 0) + 1
    clashes = {key: counts for key, counts in spellings.items() if len(counts) > 1}
    if clashes and not merge:
        shown = "; ".join(" vs ".join(f"{s!r} ({n} rows)" for s, n in sorted(c.items())) for c in clashes.values())
        raise ValueError(f"{source}: labels differ only by case or surrounding whitespace: {shown}. They would be "
                         f"separate classes; fix the file, or merge them with merge_label_case=True "
                         f"(--merge-label-case)")
    known_by_key = {_label_key(k): k for k in known}
    canonical = {}
    for key, counts in spellings.items():
        top = min(counts, key=lambda s: (-counts[s], s))
        canonical[key] = known_by_key.get(key, top.strip()) if merge else top.strip()
        changed = {s: n for s, n in counts.items() if s.strip() != canonical[key]}
        if changed:
            log.warning("%s: merged the labels %s into %r", source,
                        ", ".join(f"{s!r} ({n} rows)" for s, n in sorted(counts.items())), canonical[key])
    return [r if r.label == canonical[_label_key(r.label)] else
            LabeledText(r.text, canonical[_label_key(r.label)], r.line) for r in rows]


@dataclass(frozen=True)
class LabelMap:
    """Class names in id order; saved beside a classifier as labels.json."""

    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.labels) < 2:
            raise ValueError(f"a classifier needs at least 2 labels; got {list(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct; got {list(self.labels)}")

    @classmethod
    def from_examples(cls, examples: Sequence[LabeledText]) -> "LabelMap":
        """Sorted distinct labels, so the ids do not depend on row order."""
        return cls(tuple(sorted({e.label for e in examples})))

    def __len__(self) -> int:
        return len(self.labels)

    def id(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise ValueError(f"label {label!r} is not one of the model's labels {list(self.labels)}") from None

    def to_dict(self) -> dict:
        # The same keys as a Hugging Face config's, so the file reads familiarly.
        return {"id2label": {str(i): s for i, s in enumerate(self.labels)},
                "label2id": {s: i for i, s in enumerate(self.labels)}}

    @classmethod
    def from_dict(cls, data: dict) -> "LabelMap":
        id2label = data["id2label"]
        return cls(tuple(id2label[str(i)] for i in range(len(id2label))))

    def save(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LabelMap":
        """The labels of a fine-tuned classifier's labels.json; a damaged file names itself
        and the id that is missing."""
        fix = "re-export the model (or restore the file from its run folder's checkpoints)"
        data = read_json(path, "label file", keys=("id2label",), fix=fix)
        id2label = data["id2label"]
        if not isinstance(id2label, dict) or not id2label:
            raise BadFileError(f"label file {path}: id2label must be an object of id -> label, not {id2label!r}; {fix}")
        missing = [str(i) for i in range(len(id2label)) if str(i) not in id2label]
        if missing:
            raise BadFileError(missing_keys(Path(path), "label file", [f"id2label.{i}" for i in missing],
                                            id2label, fix))
        try:
            return cls.from_dict(data)
        except ValueError as err:  # fewer than two labels, or repeated ones
            raise BadFileError(f"label file {path}: {err}; {fix}") from None


def stratified_split(examples: Sequence, val_fraction: float, seed: int = 1337,
                     key: Callable = lambda e: e.label, group: Callable | None = None) -> tuple[list, list]:
    """Split into (train, validation) keeping each label's share, reproducibly for a seed.

    Each label contributes round(n_label * val_fraction) rows to validation (at least one
    when it has two or more rows), chosen by a seeded shuffle; both parts keep file order.
    With `group` (e.g. the text), rows with the same group key are one unit that goes to
    one side whole: duplicates never land in both train and validation, where the held-out
    score would measure memory. A group counts under its first row's label.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    members: dict = {}  # group key -> indices; a row is its own group without `group`
    for i, e in enumerate(examples):
        members.setdefault(group(e) if group is not None else i, []).append(i)
    by_label: dict = {}
    for indices in members.values():
        by_label.setdefault(key(examples[indices[0]]), []).append(indices)
    rng = random.Random(seed)
    val: set[int] = set()
    for label in sorted(by_label):
        units = by_label[label]
        n_val = round(len(units) * val_fraction)
        if len(units) >= 2:
            n_val = min(max(n_val, 1), len(units) - 1)
        chosen = list(units)
        rng.shuffle(chosen)
        for indices in chosen[:n_val]:
            val.update(indices)
    return ([e for i, e in enumerate(examples) if i not in val],
            [e for i, e in enumerate(examples) if i in val])


def duplicate_groups(examples: Sequence, group: Callable) -> list[list]:
    """Groups (in file order) of two or more examples with the same `group` key."""
    groups: dict = {}
    for e in examples:
        groups.setdefault(group(e), []).append(e)
    return [g for g in groups.values() if len(g) > 1]


def split_without_leakage(examples: Sequence, val_fraction: float, seed: int, source: str,
                          key: Callable = lambda e: e.label, group: Callable = lambda e: e.text,
                          what: str = "text") -> tuple[list, list]:
    """`stratified_split` with duplicates (same `group` key) kept on one side, and a
    warning that counts them, so a repeated row never scores the model on its own training
    data."""
    groups = duplicate_groups(examples, group)
    if groups:
        extra = sum(len(g) - 1 for g in groups)
        log.warning("%s: %d rows repeat another row's %s (%d groups, e.g. lines %s); each group is kept "
                    "whole on one side of the train/validation split, so none is both trained and held out",
                    source, extra, what,
                    len(groups), ", ".join(str(e.line) for e in groups[0]))
    train, val = stratified_split(examples, val_fraction, seed, key=key, group=group)
    if not val or not train:
        raise ValueError(
            f"{source}: {len(examples)} row{'s are' if len(examples) != 1 else ' is'} too few to hold out a "
            f"validation split at "
            f"val_fraction={val_fraction} (none is left to {'validate on' if not val else 'train on'}: only 2 or more "
            f"distinct {what}s, of one label for a classifier, give one away). Give a validation file (--val-file), a "
            f"larger training file, or a larger --val-fraction")
    return train, val


def leaked(train: Sequence, val: Sequence, group: Callable) -> list[tuple[int, int]]:
    """(validation line, training line) of each validation row whose `group` key (its text,
    its prompt) also occurs in the training rows."""
    first: dict = {}
    for e in train:
        first.setdefault(group(e), e.line)
    return [(e.line, first[group(e)]) for e in val if group(e) in first]


def report_leakage(train: Sequence, val: Sequence, group: Callable, train_file: str, val_file: str,
                   what: str) -> int:
    """Warn (with counts and example lines) when validation rows also occur in training;
    return how many do. Their scores measure memory, not generalization."""
    pairs = leaked(train, val, group)
    if pairs:
        shown = ", ".join(f"{val_file}:{v} = {train_file}:{t}" for v, t in pairs[:3])
        log.warning("%d of %d validation rows have a %s that also occurs in the training file (%s%s); their "
                    "scores are optimistic: remove them from one of the files", len(pairs), len(val), what, shown,
                    ", ..." if len(pairs) > 3 else "")
    return len(pairs)


# ---------------------------------------------------------------------- prompt/completion
@dataclass(frozen=True)
class PromptCompletion:
    prompt: str
    completion: str
    line: int


def read_prompt_completion(path: str | Path, prompt_column: str = "prompt", completion_column: str = "completion",
                           encoding: str = "utf-8") -> list[PromptCompletion]:
    """Pairs of a prompt/completion file: CSV, TSV, a JSON array or JSONL, with the pair in
    the named columns. Any defect `minigpt finetune check` would drop a row for (bad JSON,
    a missing, non-string or empty field) is a ValueError that names the lines and points
    at the checker; so is anything `minigpt.finetune.records.read_records` refuses."""
    from minigpt.finetune.check import parse_rows

    path = Path(path)
    rows, dropped, _ = parse_rows(path, prompt_column=prompt_column, completion_column=completion_column,
                                  encoding=encoding)
    if dropped:
        shown = "; ".join(f"line {d.line}: {d.reason}" for d in dropped[:5])
        more = f" (and {len(dropped) - 5} more)" if len(dropped) > 5 else ""
        raise ValueError(f"{path}: {len(dropped)} unusable rows: {shown}{more}. "
                         f"Run `minigpt finetune check {path} --fix --out FILE.jsonl` to write a cleaned copy")
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return [PromptCompletion(r.prompt, r.completion, r.line) for r in rows]


# ------------------------------------------------------------------------- tokenization
@dataclass(frozen=True)
class ClassificationExample:
    ids: tuple[int, ...]
    label: int


@dataclass(frozen=True)
class CompletionExample:
    tokens: tuple[int, ...]
    """prompt + completion (+ eos) token ids."""
    mask: tuple[bool, ...]
    """True where tokens[j] is a training target: the completion and eos, never the prompt."""


def _row(source: str | Path | None, line: int) -> str:
    """'data.csv, line 7' (or 'line 7' when the rows came from no file), for messages."""
    return f"{source}, line {line}" if source is not None else f"line {line}"


def _encode(tokenizer, text: str, source: str | Path | None, line: int) -> list[int]:
    """`tokenizer.encode(text)`; text it cannot encode (a character outside a character-level
    model's alphabet) is an error naming the file and the line."""
    try:
        return tokenizer.encode(text)
    except ValueError as err:
        raise ValueError(f"{_row(source, line)}: {err}; replace it in that row, or start from a model whose "
                         f"tokenizer has it (GPT-2's byte-level BPE encodes any text)") from None


def encode_classification(tokenizer, examples: Sequence[LabeledText], labels: LabelMap,
                          max_length: int, source: str | Path | None = None) -> list[ClassificationExample]:
    """Token ids (the first `max_length` of each text) and label ids. Truncation is logged.
    `source` is the file the rows came from, named in errors with the row's line."""
    out, truncated = [], 0
    for e in examples:
        ids = _encode(tokenizer, e.text, source, e.line)
        if not ids:
            raise ValueError(f"{_row(source, e.line)}: text {e.text!r} encodes to no tokens")
        truncated += len(ids) > max_length
        out.append(ClassificationExample(tuple(ids[:max_length]), labels.id(e.label)))
    if truncated:
        log.warning("%d of %d texts were longer than max_length=%d tokens and were truncated",
                    truncated, len(examples), max_length)
    return out


def encode_completion(tokenizer, pair: PromptCompletion, add_eos: bool = True,
                      source: str | Path | None = None) -> CompletionExample:
    """prompt + completion (+ eos), with the loss mask on the completion and eos.

    Prompt and completion are encoded separately, so the boundary between them is a token
    boundary; that is why completions should start with whitespace (the checker says so).
    """
    prompt = _encode(tokenizer, pair.prompt, source, pair.line)
    completion = _encode(tokenizer, pair.completion, source, pair.line)
    if add_eos:
        if tokenizer.eos_id is None:
            raise ValueError("this tokenizer has no eos token; pass add_eos=False and end completions "
                             "with a stop sequence instead")
        completion.append(tokenizer.eos_id)
    if not completion:
        raise ValueError(f"{_row(source, pair.line)}: the completion encodes to no tokens")
    return CompletionExample(tuple(prompt + completion), (False,) * len(prompt) + (True,) * len(completion))


def encode_completions(tokenizer, pairs: Sequence[PromptCompletion], block_size: int,
                       add_eos: bool = True, source: str | Path | None = None) -> list[CompletionExample]:
    """Encode every pair; a pair longer than block_size + 1 tokens is an error listing them
    all (the checker's --fix drops them, and says which)."""
    out = [encode_completion(tokenizer, p, add_eos, source) for p in pairs]
    too_long = [(p.line, len(e.tokens)) for p, e in zip(pairs, out) if len(e.tokens) > block_size + 1]
    if too_long:
        shown = ", ".join(f"line {line} ({n} tokens)" for line, n in too_long[:5])
        raise ValueError(f"{len(too_long)} examples exceed block_size + 1 = {block_size + 1} tokens: {shown}"
                         f"{' ...' if len(too_long) > 5 else ''}. Shorten them, or drop them with "
                         f"`minigpt finetune check FILE --fix`")
    return out


def pack_completions(examples: Sequence[CompletionExample], block_size: int,
                     seed: int = 1337) -> list[CompletionExample]:
    """Concatenate examples (in a seeded random order) into rows of at most block_size + 1
    tokens, so little compute goes to padding.

    Each example ends with eos, so a row reads "a1 ... eos b1 ... eos". Later examples in a
    row can attend to earlier ones (the usual trade of packing); their loss masks are kept,
    so the prompts still carry no loss. Use padding instead for fully isolated examples.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[CompletionExample] = []
    tokens: list[int] = []
    mask: list[bool] = []
    for i in order:
        e = examples[i]
        if tokens and len(tokens) + len(e.tokens) > block_size + 1:
            rows.append(CompletionExample(tuple(tokens), tuple(mask)))
            tokens, mask = [], []
        tokens += e.tokens
        mask += e.mask
    if tokens:
        rows.append(CompletionExample(tuple(tokens), tuple(mask)))
    return rows


# ------------------------------------------------------------------------------ batches
def collate_classification(examples: Sequence[ClassificationExample], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """{"idx": (B, T) right-padded ids, "lengths": (B,), "labels": (B,)}; T is the longest row.
    Lengths are checked here, on the CPU: ValueError for an example with no tokens."""
    lengths = [len(e.ids) for e in examples]
    if min(lengths) < 1:
        raise ValueError(f"example {lengths.index(0)} of the batch has no tokens; every text needs at least one")
    idx = torch.full((len(examples), max(lengths)), pad_id, dtype=torch.long)
    for i, e in enumerate(examples):
        idx[i, : len(e.ids)] = torch.tensor(e.ids)
    return {"idx": idx, "lengths": torch.tensor(lengths), "labels": torch.tensor([e.label for e in examples])}


def collate_completion(examples: Sequence[CompletionExample], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """{"idx": (B, T), "targets": (B, T), "target_positions": (N,)} with T = longest row - 1;
    targets are -100 on prompt tokens and padding, so `GPT(idx, targets).loss` averages over
    completion tokens only. target_positions: the flat (B*T) row-major indices of positions
    with a target, found on the CPU (a boolean mask on the device would wait for its size)."""
    T = max(len(e.tokens) for e in examples) - 1
    idx = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        tokens, mask, n = torch.tensor(e.tokens), torch.tensor(e.mask), len(e.tokens) - 1
        idx[i, :n] = tokens[:-1]
        targets[i, :n] = torch.where(mask[1:], tokens[1:], IGNORE_INDEX)
    positions = torch.nonzero(targets.flatten() != IGNORE_INDEX).flatten()  # (N,), ascending
    return {"idx": idx, "targets": targets, "target_positions": positions}


class ShuffledBatches:
    """Endless batches over a fixed list of examples, for the training loop (`Batches`).

    Epoch e visits the examples in the order of a permutation drawn from (seed, e); with
    several ranks (torchrun), rank r reads every world_size-th entry of that order from
    offset r, so ranks see disjoint examples. `state_dict()` (epoch, position) is all a
    resumed run needs to see the batches it would have seen.
    """

    def __init__(self, examples: Sequence, batch_size: int, collate: Callable[[Sequence], dict],
                 seed: int = 1337, rank: int = 0, world_size: int = 1) -> None:
        if not examples:
            raise ValueError("no training examples")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in 0..world_size-1={world_size - 1}")
        if len(examples) < world_size:
            raise ValueError(f"{len(examples)} examples cannot be shared among {world_size} ranks")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.collate = collate
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()[self.rank :: self.world_size]

    def next_batch(self) -> dict[str, torch.Tensor]:
        chosen = []
        while len(chosen) < self.batch_size:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(chosen), len(self._order) - self.position)
            chosen += self._order[self.position : self.position + take]
            self.position += take
        return self.collate([self.examples[i] for i in chosen])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": len(self.examples),
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        state = {"batch_size": self.batch_size, **state}  # older checkpoints do not record it
        differs = [k for k in ("n", "seed", "world_size", "batch_size") if state.get(k) != mine[k]]
        if differs:
            raise ValueError(f"batch state is for {state.get('n')} examples, seed {state.get('seed')}, "
                             f"{state.get('world_size')} data-parallel ranks of batch {state.get('batch_size')}; "
                             f"this run has {len(self.examples)}, {self.seed}, {self.world_size}, "
                             f"{self.batch_size}. Resume with the same data, seed, data-parallel ranks and batch size")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


def fixed_batches(examples: Sequence, batch_size: int, collate: Callable[[Sequence], dict]) -> Iterator[dict]:
    """Every example once, in order, in batches (evaluation)."""
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i : i + batch_size])
