"""Key/value cache for incremental decoding.

A dense layer keeps every past key (a preallocated buffer of block_size slots, written
in place). A banded layer of width w never looks further back than w - 1 tokens, so it
keeps only a ring of w slots: token index p lives in slot p % w. Softmax does not care
about the order of keys, so the ring is never re-sorted; each slot's absolute index is
computed to build the mask.

Rows of one cache share a clock (`length`, the next token index) and each row may start
late (`left_pad`: its first `left_pad[b]` slots are padding, masked out of attention). That
is how prompts of different lengths decode in one batch, and how a server batches requests
continuously (`minigpt.serve.engine`): a request prefilled on its own is `shift`ed to end at
the batch's clock and `concat`enated to it, a finished one `select`ed away, and when the
clock would pass block_size the batch is shifted left over the padding every row has.
"""
from __future__ import annotations

import torch

from minigpt.config import GPTConfig


class LayerCache:
    """Keys and values of one layer: (B, H, capacity, D) buffers."""

    def __init__(self, config: GPTConfig, layer: int, batch_size: int, dtype: torch.dtype, device,
                 max_length: int | None = None) -> None:
        self.window = config.layer_window(layer)
        # No token index reaches max_length, so a ring of min(w, max_length) slots never wraps
        # onto a slot still in use: slot p % w is p itself.
        longest = config.block_size if max_length is None else min(max_length, config.block_size)
        capacity = longest if self.window is None else min(self.window, longest)
        shape = (batch_size, config.n_head, capacity, config.head_dim)
        # Uninitialised: a slot is always written before any query reads it.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    def _ring_index(self, count: int, end: int) -> torch.Tensor:
        """Absolute indices held by ring slots 0..count-1 when tokens 0..end-1 were written."""
        slots = torch.arange(count, device=self.k.device)
        return (end - 1) - ((end - 1 - slots) % self.window)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add the keys/values of tokens start..start+T-1; return what their queries attend to.

        k, v: (B, H, T, D). Returns (keys, values, key_index): keys/values (B, H, S, D) and
        the absolute token index of each of the S keys.
        """
        T = k.shape[-2]
        end = start + T
        if self.window is None:
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
            return self.k[:, :, :end], self.v[:, :, :end], torch.arange(end, device=k.device)

        w = self.window
        if T == 1:  # decoding: write first, then every filled slot is visible
            self.k[:, :, start % w] = k[:, :, 0]
            self.v[:, :, start % w] = v[:, :, 0]
            count = min(end, w)
            return self.k[:, :, :count], self.v[:, :, :count], self._ring_index(count, end)

        # A chunk of several tokens: its early queries may need ring entries that its own
        # later tokens would overwrite, so attend to (old ring + new chunk), then store.
        count = min(start, w)
        keys = torch.cat([self.k[:, :, :count], k], dim=2)
        values = torch.cat([self.v[:, :, :count], v], dim=2)
        index = torch.cat([self._ring_index(count, start), torch.arange(start, end, device=k.device)])
        keep = min(T, w)
        slots = torch.arange(end - keep, end, device=k.device) % w
        self.k[:, :, slots] = k[:, :, T - keep :]
        self.v[:, :, slots] = v[:, :, T - keep :]
        return keys, values, index


class KVCache:
    """Per-layer caches plus the decoding position and each row's left padding.

    left_pad: (B,) number of padding tokens at the start of each row (prompts of different
    lengths are left-padded); None when no row is padded.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        left_pad: torch.Tensor | None = None,
        max_length: int | None = None,
    ) -> None:
        """max_length: the most tokens a row will hold (default block_size); a smaller value
        allocates smaller buffers."""
        self.layers = [LayerCache(config, i, batch_size, dtype, device, max_length) for i in range(config.n_layer)]
        self.length = 0
        self.left_pad = left_pad

    def can_truncate(self) -> bool:
        """Whether `truncate` is possible: no banded ring has wrapped onto an older token."""
        return all(layer.window is None or self.length <= layer.k.shape[2] for layer in self.layers)

    def truncate(self, length: int) -> None:
        """Forget the tokens from position `length` on; the next update writes there again.

        Scoring several continuations of one context encodes the context, then runs and
        forgets each continuation in turn. Dense layers keep every token in its own slot; a
        banded ring can be cut only while it has not wrapped (see `can_truncate`).
        """
        if not 0 <= length <= self.length:
            raise ValueError(f"length={length} must be in 0..{self.length}, the tokens this cache holds")
        if not self.can_truncate():
            raise ValueError(f"a banded layer's ring of {min(l.k.shape[2] for l in self.layers)} slots has wrapped "
                             f"after {self.length} tokens, so older tokens are gone; make the cache with "
                             f"max_length <= the window, or copy it per continuation with select()")
        self.length = length

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache whose row i is a copy of this cache's row rows[i] (rows may repeat).

        Scoring several continuations of one context encodes the context once and
        continues each copy of its cache with one continuation.
        """
        new = object.__new__(KVCache)
        new.layers = []
        for layer in self.layers:
            copy = object.__new__(LayerCache)
            copy.window = layer.window
            copy.k = layer.k.index_select(0, rows)  # (R, H, capacity, D)
            copy.v = layer.v.index_select(0, rows)
            new.layers.append(copy)
        new.length = self.length
        new.left_pad = None if self.left_pad is None else self.left_pad.index_select(0, rows)
        return new

    def zero_(self) -> "KVCache":
        """Fill every slot with zeros. A cache that will be `shift`ed or `concat`enated reads
        slots no token wrote (they become padding, masked out), and an uninitialised slot
        could hold NaN, which a zero attention weight does not cancel (0 * NaN = NaN)."""
        for layer in self.layers:
            layer.k.zero_()
            layer.v.zero_()
        return self

    def pads(self) -> torch.Tensor:
        """(B,) left padding of every row (zeros when there is none)."""
        if self.left_pad is not None:
            return self.left_pad
        return torch.zeros(self.layers[0].k.shape[0], dtype=torch.long, device=self.layers[0].k.device)

    def shift(self, by: int) -> None:
        """Move every row `by` token positions later (by > 0: that much more left padding) or
        earlier (by < 0: drop `-by` slots of padding that every row has).

        A token at absolute index p sits in slot p of a dense layer and p % w of a banded
        ring, so moving all of them by `by` is a roll of the slots by `by` in both (the ring's
        capacity is w; a dense layer's holds the clock's whole range, which `by` must keep
        within). Positions are index - left_pad, so no key or value changes.
        """
        if by == 0:
            return
        pads = self.pads()
        if by < 0 and int(pads.min()) < -by:
            raise ValueError(f"shift({by}) would drop real tokens: the least padded row has {int(pads.min())} slots")
        capacity = min(layer.k.shape[2] for layer in self.layers if layer.window is None) \
            if any(layer.window is None for layer in self.layers) else None
        if by > 0 and capacity is not None and self.length + by > capacity:
            raise ValueError(f"shift({by}) past the {capacity} slots of a dense layer (the clock is at {self.length})")
        for layer in self.layers:
            layer.k = torch.roll(layer.k, by, dims=2)
            layer.v = torch.roll(layer.v, by, dims=2)
        self.length += by
        self.left_pad = pads + by

    @staticmethod
    def concat(caches: list["KVCache"]) -> "KVCache":
        """One cache holding the rows of `caches` in order; they must share the clock
        (`shift` one of them first) and the layout (the same model and max_length)."""
        lengths = {c.length for c in caches}
        if len(lengths) != 1:
            raise ValueError(f"caches at clocks {sorted(lengths)} cannot be joined; shift them to one clock first")
        new = object.__new__(KVCache)
        new.layers = []
        for parts in zip(*(c.layers for c in caches)):
            joined = object.__new__(LayerCache)
            joined.window = parts[0].window
            joined.k = torch.cat([p.k for p in parts])  # (sum B, H, capacity, D)
            joined.v = torch.cat([p.v for p in parts])
            new.layers.append(joined)
        new.length = lengths.pop()
        pads = [c.pads() for c in caches]
        new.left_pad = torch.cat(pads) if any(c.left_pad is not None for c in caches) else None
        return new

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]
