"""Key/value cache for incremental decoding.

A dense layer keeps every past key (a preallocated buffer of block_size slots, written
in place). A banded layer of width w never looks further back than w - 1 tokens, so it
keeps only a ring of w slots: token index p lives in slot p % w. Softmax does not care
about the order of keys, so the ring is never re-sorted; each slot's absolute index is
computed to build the mask.

Rows of one cache share a clock (`length`, the next token index) and each row may start
late (`left_pad`: its first `left_pad[b]` slots are padding, masked out of attention). That
is how prompts of different lengths decode in one batch, and how a server batches requests
continuously (`BatchCache`, for `minigpt.serve.engine`): rows join and leave a preallocated
batch in place, each moved to end at the batch's clock.
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

    def check_fits(self, end: int) -> None:
        """Raise ValueError unless tokens up to `end` - 1 fit: a dense layer holds max_length
        tokens, and so does a banded layer whose ring max_length made shorter than its window.
        (A slice past the buffer is empty, and a one-token write into it would broadcast to
        nothing: the token would be lost.)"""
        capacity = self.k.shape[2]
        if end > capacity and (self.window is None or capacity < self.window):
            raise ValueError(f"this KV cache holds {capacity} tokens (max_length) and token {end - 1} does not fit; "
                             f"make it with max_length >= {end}")

    def one_token_slots(self, start: int) -> tuple[int, int]:
        """Where token `start` goes when it comes alone (decoding), and how many slots its query
        then sees: every filled one (a dense layer's tokens 0..start, a banded layer's ring).
        Both fit the buffers once `check_fits(start + 1)` has passed."""
        if self.window is None:
            return start, start + 1
        return start % self.window, min(start + 1, self.window)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add the keys/values of tokens start..start+T-1; return what their queries attend to.

        k, v: (B, H, T, D). Returns (keys, values, key_index): keys/values (B, H, S, D) and
        the absolute token index of each of the S keys.
        """
        T = k.shape[-2]
        end = start + T
        self.check_fits(end)
        if self.window is None:
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
            return self.k[:, :, :end], self.v[:, :, :end], torch.arange(end, device=k.device)

        w = self.window
        if T == 1:  # decoding: write first, then every filled slot is visible
            slot, count = self.one_token_slots(start)
            self.k[:, :, slot] = k[:, :, 0]
            self.v[:, :, slot] = v[:, :, 0]
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


class BatchCache:
    """A KV cache that rows join and leave while the others decode (continuous batching).

    Buffers for `max_rows` rows are allocated once (zeros: a slot no token wrote is read as
    padding, and must not be NaN, which a zero attention weight would not cancel); the rows
    in use are always 0..size-1, and `view()` is a KVCache over them for the model.

    A row joins with `join()`: it is prefilled alone through `row_view(size)` (its tokens at
    positions 0..P-1), then moved P - clock slots so that it ends at the batch's clock, left
    padding masking the slots before it; a prompt longer than the clock moves the others
    instead. `leave(r)` moves the last row into r. When the clock would pass the context,
    `compact()` moves every row left over the padding all of them have. Moving a token at
    absolute index p means copying the dense slots in use (p lives in slot p) and rolling a
    banded ring (p lives in slot p % w); positions are index - left_pad, so no key or value
    changes. Each move copies only what it moves: a row joining a full batch costs one row.
    """

    def __init__(self, config: GPTConfig, max_rows: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.config, self.max_rows = config, max_rows
        self.layers = [LayerCache(config, i, max_rows, dtype, device) for i in range(config.n_layer)]
        for layer in self.layers:
            layer.k.zero_()
            layer.v.zero_()
        self.size = 0
        self.length = 0
        self.pads = torch.zeros(max_rows, dtype=torch.long, device=device)

    def _layer_view(self, layer: LayerCache, rows: slice) -> LayerCache:
        view = object.__new__(LayerCache)
        view.window, view.k, view.v = layer.window, layer.k[rows], layer.v[rows]  # views: writes land here
        return view

    def view(self) -> KVCache:
        """A KVCache over rows 0..size-1 at the batch's clock; read `.length` back after a forward."""
        cache = object.__new__(KVCache)
        cache.layers = [self._layer_view(layer, slice(0, self.size)) for layer in self.layers]
        cache.length = self.length
        cache.left_pad = self.pads[: self.size]
        return cache

    def row_view(self, row: int) -> KVCache:
        """A one-row KVCache over row `row`, empty (clock 0): what a prompt is prefilled into."""
        cache = object.__new__(KVCache)
        cache.layers = [self._layer_view(layer, slice(row, row + 1)) for layer in self.layers]
        cache.length = 0
        cache.left_pad = None
        return cache

    def _move(self, rows: slice, used: int, by: int) -> None:
        """Move the tokens of `rows` (slots 0..used-1 of the dense layers) `by` positions."""
        for layer in self.layers:
            for buf in (layer.k, layer.v):
                if layer.window is None:
                    lo, hi = (0, used) if by > 0 else (-by, used)
                    buf[rows, :, lo + by:hi + by] = buf[rows, :, lo:hi].clone()
                else:
                    buf[rows] = torch.roll(buf[rows], by, dims=2)

    def join(self, prompt_length: int) -> None:
        """Add row `size`, prefilled through `row_view(size)` with `prompt_length` tokens."""
        if self.size >= self.max_rows:
            raise ValueError(f"the batch is full ({self.max_rows} rows)")
        row, gap = self.size, self.length - prompt_length
        if self.size == 0:
            self.length = prompt_length
            self.pads[row] = 0
        elif gap >= 0:
            self._move(slice(row, row + 1), prompt_length, gap)
            self.pads[row] = gap
        else:  # the prompt is longer than the clock: move the batch later instead
            self._check_room(-gap)
            self._move(slice(0, row), self.length, -gap)
            self.pads[:row] -= gap
            self.length = prompt_length
            self.pads[row] = 0
        self.size += 1

    def leave(self, row: int) -> int:
        """Drop row `row`; the last row moves into its place. Returns the index that moved there
        (the caller reorders its rows alike), or -1 when `row` was the last."""
        last = self.size - 1
        self.size -= 1
        if row == last:
            if self.size == 0:
                self.length = 0
            return -1
        for layer in self.layers:
            used = layer.k.shape[2] if layer.window is not None else self.length
            layer.k[row, :, :used] = layer.k[last, :, :used]
            layer.v[row, :, :used] = layer.v[last, :, :used]
        self.pads[row] = self.pads[last]
        return last

    def compact(self) -> None:
        """Move every row left over the padding all of them have (the clock drops by that much)."""
        if self.size == 0:
            return
        drop = int(self.pads[: self.size].min())
        if drop:
            self._move(slice(0, self.size), self.length, -drop)
            self.pads[: self.size] -= drop
            self.length -= drop

    def _check_room(self, by: int) -> None:
        if self.length + by > self.config.block_size:
            raise ValueError(f"moving the batch {by} slots later passes the context ({self.length} + {by} > "
                             f"{self.config.block_size})")
