"""Fine-tuning examples and their batches, the part every task shares.

Two shapes of example are served:
- classification: token ids of a text and a label id; batches are right-padded and carry
  each row's length, so the head can find the last real token;
- completion: the tokens of prompt + completion + eos and a mask that is True where a
  token is a training target. A row's input is tokens[:-1] and its targets are
  tokens[1:], with -100 (ignored by the loss) wherever the target is a prompt token.

`ShuffledBatches` serves both to the training loop: endless batches, reshuffled each epoch
from (seed, epoch), whose position is part of the checkpoint so a resumed run sees the
batches it would have seen. `LabelMap` is a classifier's class names (labels.json).
Reading rows and encoding them is each task's own (`minigpt.finetune.classify`,
`minigpt.finetune.completion`); splitting off validation rows is `minigpt.finetune.split`.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt.files import BadFileError, missing_keys, read_json, write_text

IGNORE_INDEX = -100
"""Target value the loss skips (`F.cross_entropy`'s ignore_index)."""


# ------------------------------------------------------------------------------ examples
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


def row_name(source: str | Path | None, line: int) -> str:
    """'data.csv, line 7' (or 'line 7' when the rows came from no file), for messages."""
    return f"{source}, line {line}" if source is not None else f"line {line}"


def encode_text(tokenizer, text: str, source: str | Path | None, line: int) -> list[int]:
    """`tokenizer.encode(text)`; text it cannot encode (a character outside a character-level
    model's alphabet) is an error naming the file and the line."""
    try:
        return tokenizer.encode(text)
    except ValueError as err:
        raise ValueError(f"{row_name(source, line)}: {err}; replace it in that row, or start from a model whose "
                         f"tokenizer has it (GPT-2's byte-level BPE encodes any text)") from None


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
    def from_examples(cls, examples: Sequence) -> "LabelMap":
        """Sorted distinct labels of rows that have a `.label`, so the ids do not depend on row order."""
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
