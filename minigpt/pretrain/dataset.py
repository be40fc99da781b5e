"""Token shards -> training batches: memory-mapped, random windows, resumable, rank-aware.

`RandomWindows` draws windows of block_size + 1 tokens at uniformly random positions
(windows never cross a shard boundary). Every rank draws the same offsets for the global
batch from one seeded generator and keeps its own rows, so 2 ranks with batch B see
exactly what 1 rank with batch 2B sees, and the generator's state is the whole position
of the loader in a checkpoint.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from minigpt.files import BadFileError
from minigpt.pretrain.meta import PREPARE_AGAIN, SPLITS, read_metadata


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


class TokenSplit:
    """One split ('train' or 'val') of a prepared folder, its shards memory-mapped.

    Each shard's size must match meta.json; with `verify` its sha256 must match too, and
    every id must be below vocab_size. Without `verify`, each window is checked for ids
    out of range as it is read (a max over block_size + 1 ids, negligible beside a step),
    so a corrupted shard stops the run with its name instead of an embedding IndexError.
    Raises FileNotFoundError / ValueError naming the shard and what disagrees.
    """

    def __init__(self, folder: str | Path, split: str, verify: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        folder = Path(folder)
        self.meta = read_metadata(folder)
        try:
            info = self.meta["splits"].get(split)
            if not info or info["tokens"] == 0:
                raise ValueError(f"{folder} has no '{split}' tokens; prepare it with a val_fraction > 0")
            dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
            self.arrays: list[np.ndarray] = []
            self.paths: list[Path] = []
            self.vocab_size: int = self.meta["vocab_size"]
            for shard in info["shards"]:
                path = folder / shard["file"]
                if not path.is_file():
                    raise FileNotFoundError(f"shard {path} listed in meta.json is missing; re-run `minigpt prepare`")
                expected = shard["tokens"] * dtype.itemsize
                size = path.stat().st_size
                if size != expected:
                    raise ValueError(
                        f"shard {path} has {size} bytes but meta.json says {shard['tokens']} {dtype.name} tokens "
                        f"({expected} bytes); the shard and its metadata do not match, re-run `minigpt prepare`"
                    )
                if verify and _sha256(path) != shard["sha256"]:
                    raise ValueError(f"shard {path} does not match the sha256 in meta.json; re-run `minigpt prepare`")
                self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))
                self.paths.append(path)
                if verify:
                    self._check_ids(len(self.arrays) - 1, self.arrays[-1], 0)
            self.split = split
            self.tokenizer: dict = self.meta["tokenizer"]
        except (KeyError, TypeError, AttributeError) as err:  # a split or shard entry cut or edited
            what = f"the key {err.args[0]!r}" if isinstance(err, KeyError) else f"a well-formed entry ({err})"
            raise BadFileError(f"prepared-data metadata {folder / 'meta.json'}: the {split!r} split lacks {what}; "
                               f"it is damaged. {PREPARE_AGAIN[0].upper()}{PREPARE_AGAIN[1:]}") from None

    def __len__(self) -> int:
        return sum(len(a) for a in self.arrays)

    def windows(self, block_size: int) -> np.ndarray:
        """Cumulative count of window start positions per shard (windows of block_size + 1)."""
        counts = [max(0, len(a) - block_size) for a in self.arrays]
        if sum(counts) == 0:
            raise ValueError(
                f"the '{self.split}' split has {len(self)} tokens, too few for one window of "
                f"block_size + 1 = {block_size + 1}; lower block_size or add data"
                + (", or hold out more for validation (--data.val_fraction)" if self.split == "val" else "")
            )
        return np.cumsum(counts)

    def rows(self, cumulative: np.ndarray, indices: list[int], block_size: int) -> np.ndarray:
        """The windows of block_size + 1 tokens with these window indices (positions counted
        over the shards, `windows`), as (len(indices), block_size + 1) int64, read a shard at
        a time."""
        indices = np.asarray(indices, dtype=np.int64)
        shards = np.searchsorted(cumulative, indices, side="right")
        offsets = indices - np.concatenate(([0], cumulative[:-1]))[shards]  # minus the shard's first index
        out = np.empty((len(indices), block_size + 1), dtype=np.int64)
        span = np.arange(block_size + 1)
        for shard in np.unique(shards).tolist():
            mine = shards == shard
            ids = self.arrays[shard][offsets[mine, None] + span]  # (rows, block_size + 1)
            if ids.size and int(ids.max()) >= self.vocab_size:
                for row, offset in zip(ids, offsets[mine].tolist()):
                    self._check_ids(shard, row, offset)  # raises, naming the first bad id
            out[mine] = ids
        return out

    def _check_ids(self, shard: int, ids: np.ndarray, offset: int) -> None:
        """ValueError naming the shard, the position, the id and the vocabulary size when an
        id in `ids` (read at token `offset` of the shard) is out of range."""
        if len(ids) and int(ids.max()) >= self.vocab_size:
            at = int(np.argmax(ids >= self.vocab_size))
            raise ValueError(
                f"shard {self.paths[shard]}: token id {int(ids[at])} at token {offset + at} is out of range for "
                f"the vocabulary of {self.vocab_size} ids in meta.json; the shard is corrupted (check it with "
                f"--data.verify=true) or was written by another preparation: re-run `minigpt prepare`")


class RandomWindows:
    """A resumable source of batches {'idx': (B, T), 'targets': (B, T)} of int64 token ids.

    `batch_size` is per rank; the generator draws world_size * batch_size offsets per batch
    and this rank keeps rows rank * batch_size .. (rank + 1) * batch_size.
    """

    def __init__(
        self, data: TokenSplit, block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.cumulative = data.windows(block_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        total = int(self.cumulative[-1])
        starts = torch.randint(total, (self.world_size * self.batch_size,), generator=self.generator)
        mine = starts[self.rank * self.batch_size: (self.rank + 1) * self.batch_size].tolist()
        x = torch.from_numpy(self.data.rows(self.cumulative, mine, self.block_size))  # (B, T + 1)
        self.batches += 1
        return {"idx": x[:, :-1].contiguous(), "targets": x[:, 1:].contiguous()}  # (B, T) x 2

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches": self.batches,
                "block_size": self.block_size, "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        mine = {"block_size": self.block_size, "global_batch": self.batch_size * self.world_size}
        theirs = {k: state[k] for k in mine}
        if mine != theirs:
            raise ValueError(f"loader state was saved with {theirs}, this loader has {mine}")
        self.generator.set_state(state["generator"])
        self.batches = state["batches"]


class FixedWindows:
    """Evaluation batches: calling it returns a fresh iterator over the same `steps` batches."""

    def __init__(
        self, data: TokenSplit, block_size: int, batch_size: int, steps: int, seed: int = 0,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        self.args = (data, block_size, batch_size, seed, rank, world_size)
        self.steps = steps

    def __call__(self) -> Iterator[dict[str, torch.Tensor]]:
        windows = RandomWindows(*self.args)
        for _ in range(self.steps):
            yield windows.next_batch()
