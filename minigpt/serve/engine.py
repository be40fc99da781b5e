"""Continuous batching: one decoding loop that every request joins and leaves on its own.

The scheduling of vLLM and llama.cpp's server, on minigpt's own KV cache: each step the
loop first admits waiting requests (up to `max_batch` rows), each prefilled on its own into
a free row of the batch's cache and moved to end at the batch's clock (`BatchCache.join`: a
row that starts late is left-padded, which attention masks out), then samples one token for
every row with that row's own settings, stop strings and random generator, and drops the
rows that finished or whose client went away (`BatchCache.leave`). So a long request never
holds short ones back and no request waits for a batch to fill. Banded layers keep their
ring of w slots: moving a row rolls its ring with its dense slots.

A request's tokens are those `minigpt.generate` gives for the same prompt and settings:
the logits come from the same function (`next_token_logits`) and each row samples with
`sample_next` from a generator seeded by its own seed, whatever else is in the batch.

Nothing here knows HTTP: `minigpt.serve.app` turns requests into `Sequence`s and the events
each one receives (`Sequence.events`, filled from the loop's thread) into responses.
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from minigpt.cache import BatchCache
from minigpt.generate import TextStream, mask_undecodable, next_token_logits, sample_next

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How one sequence is sampled and when it ends."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    """How many of the most likely tokens to report per position (None: no log-probabilities)."""
    echo: bool = False
    """Report the prompt's own tokens (and with `logprobs`, their log-probabilities) first."""


@dataclass
class TokenInfo:
    """One token of a response: its id, and with log-probabilities asked for, its text, its
    log-probability and the most likely alternatives."""

    id: int
    text: str
    logprob: float | None = None
    top: dict[str, float] | None = None


@dataclass
class Sequence:
    """One completion being produced: a prompt, its sampling, and what the loop hands back.

    `events` receives, from the loop's thread, ("prompt", [TokenInfo]) when `echo` is set,
    ("token", TokenInfo, text_piece) per generated token, and last ("done", finish_reason)
    or ("error", message). `cancel()` (a client that went away) frees the row at the next step.
    """

    prompt: list[int]
    sampling: Sampling
    deliver: Callable[[tuple], None]
    """Called from the loop's thread with each event (the app posts it to its event loop)."""
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


IDLE_POLL_S = 0.05
"""How often an idle loop looks for work other than requests (a request wakes it at once)."""


class QueueFull(Exception):
    """More requests wait than `max_queue`: the caller should answer 429."""


class _Row:
    """A sequence in the running batch: its text so far and its random generator."""

    def __init__(self, seq: Sequence, tokenizer, device: torch.device) -> None:
        self.seq = seq
        self.ended = False
        self.text = TextStream(tokenizer, seq.sampling.stop)
        self.generator = torch.Generator(device=device)
        if seq.sampling.seed is not None:
            self.generator.manual_seed(seq.sampling.seed)
        else:
            self.generator.seed()

    def end(self, event: tuple) -> None:
        """Deliver the sequence's last event ("done" or "error"), once."""
        if not self.ended:
            self.ended = True
            self.seq.deliver(event)


class Engine:
    """The decoding loop, on a thread of its own; `submit` from any thread.

    Args:
        model: a GPT (in eval mode here), on the device it runs on.
        tokenizer: its tokenizer (decode, eos_id, vocab_size).
        max_batch: rows decoded together at most; more requests wait their turn.
        max_queue: requests waiting at most; one more is refused (`QueueFull`).
    """

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 256) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and max_queue={max_queue} >= 0")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = model.lm_head.weight.device
        self.vocab_limit = getattr(tokenizer, "vocab_size", None)
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self._waiting: queue.Queue[Sequence | None] = queue.Queue()
        self._calls: queue.Queue[tuple[Callable, concurrent.futures.Future]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.busy_rows = 0

    # -- the outside ---------------------------------------------------------------------

    def start(self) -> "Engine":
        """Start the loop's thread (once; starting a running engine does nothing)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="minigpt-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """End the loop after its current step; sequences still running get an error event."""
        self._stop.set()
        self._waiting.put(None)  # wake it
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, seq: Sequence) -> None:
        """Queue `seq`; raises QueueFull when `max_queue` requests already wait, ValueError when
        its prompt is empty or longer than the model's context."""
        block_size = self.model.config.block_size
        if not 1 <= len(seq.prompt) <= block_size:
            raise ValueError(f"a prompt of {len(seq.prompt)} tokens must have 1 to {block_size} (the model's context)")
        if self.waiting >= self.max_queue:
            raise QueueFull(f"{self._waiting.qsize()} requests are waiting (max_queue={self.max_queue})")
        self._waiting.put(seq)

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run `fn` on the loop's thread between two steps; its result comes in the Future.

        For work that uses the model another way (the inside view attaches hook points for
        one forward): run beside the loop, it would see, and disturb, the batch's forward."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, future))  # an idle loop looks every IDLE_POLL_S
        return future

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                with torch.no_grad():
                    future.set_result(fn())
            except Exception as err:  # noqa: BLE001 - the caller gets it
                future.set_exception(err)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    # -- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        batch = _Batch()
        while not self._stop.is_set():
            self._run_calls()
            try:
                with torch.no_grad():
                    self._admit(batch, block=not batch.size)
                    if batch.size:
                        self._step(batch)
            except Exception as err:  # noqa: BLE001 - a failing step ends its sequences, not the server
                log.exception("decoding step failed")
                for row in batch.rows + batch.sliding:
                    row.end(("error", f"{type(err).__name__}: {err}"))
                batch = _Batch()
            self.busy_rows = batch.size
        for row in batch.rows + batch.sliding:
            row.end(("error", "the server is shutting down"))

    def _admit(self, batch: "_Batch", block: bool) -> None:
        """Prefill waiting sequences one by one and join each to the batch, while rows are free."""
        if batch.pool is None:
            weight = self.model.lm_head.weight
            batch.pool = BatchCache(self.model.config, self.max_batch, dtype=weight.dtype, device=weight.device)
        while batch.size < self.max_batch:
            try:
                seq = self._waiting.get(timeout=IDLE_POLL_S) if block else self._waiting.get_nowait()
            except queue.Empty:
                break
            if seq is None or self._stop.is_set():
                break
            block = False
            if seq.cancelled:
                continue
            try:  # a request that cannot start ends alone, with its error; the batch goes on
                row = _Row(seq, self.tokenizer, self.device)
                row_logits = self._prefill(seq, batch.pool.row_view(batch.pool.size))
            except Exception as err:  # noqa: BLE001
                log.exception("a request failed at its prompt")
                seq.deliver(("error", f"{type(err).__name__}: {err}"))
                continue
            if row_logits is None:  # finished at the prompt (max_tokens=0)
                continue
            batch.pool.join(len(seq.prompt))
            batch.rows.append(row)
            batch.logits = row_logits if batch.logits is None else torch.cat([batch.logits, row_logits])
            self.busy_rows = batch.size  # from now on /health counts it (before its first token is out)

    def _prefill(self, seq: Sequence, cache) -> torch.Tensor | None:
        """Run the prompt into `cache`; deliver its echo; return its next logits, or None when it
        is done at the prompt (max_tokens=0)."""
        s = seq.sampling
        ids = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)
        if s.echo:
            out = self.model(ids, cache=cache)
            all_logits = mask_undecodable(out.logits[0].float(), self.vocab_limit)  # (P, V)
            seq.deliver(("prompt", self._prompt_tokens(seq.prompt, all_logits, s.logprobs)))
            last = all_logits[-1:]
        else:
            last = next_token_logits(self.model, ids, cache=cache, vocab_limit=self.vocab_limit)
        if s.max_tokens == 0:
            seq.deliver(("done", "length"))
            return None
        return last

    def _prompt_tokens(self, prompt: list[int], logits: torch.Tensor, k: int | None) -> list[TokenInfo]:
        """The prompt's tokens; with k, each one's log-probability given those before it (None for
        the first, which nothing predicts) and the k most likely tokens there."""
        out = [TokenInfo(prompt[0], self.tokenizer.decode([prompt[0]]))]
        logp = torch.log_softmax(logits, dim=-1) if k is not None else None  # (P, V)
        for i, token in enumerate(prompt[1:]):
            info = TokenInfo(token, self.tokenizer.decode([token]))
            if logp is not None:
                info.logprob, info.top = float(logp[i, token]), self._top(logp[i], k)
            out.append(info)
        return out

    def _top(self, logp: torch.Tensor, k: int) -> dict[str, float]:
        if k <= 0:
            return {}
        values, ids = torch.topk(logp, min(k, logp.shape[-1]))
        top: dict[str, float] = {}
        for v, i in zip(values.tolist(), ids.tolist()):
            top.setdefault(self.tokenizer.decode([i]), v)  # two ids may decode alike: keep the likelier
        return top

    def _step(self, batch: "_Batch") -> None:
        """Sample a token for every row, deliver it, drop finished rows, run the rest one token on.

        A row whose sequence outgrows the context leaves the cached batch and continues, as
        `generate` does, on its last block_size tokens, recomputed every step (`batch.sliding`,
        all such rows in one forward without a cache)."""
        self.steps += 1
        block_size = self.model.config.block_size
        tokens: list[int | None] = []
        slide = []
        for i, row in enumerate(batch.rows):
            token = self._sample(row, batch.logits, i)
            if token is not None and len(row.seq.prompt) + len(row.seq.generated) > block_size:
                slide.append(row)  # past the context: on to the sliding window
                token = None
            tokens.append(token)
        sliding = [row for i, row in enumerate(batch.sliding) if self._sample(row, batch.slide_logits, i) is not None]
        for i in reversed(range(len(batch.rows))):  # drop finished rows; the last row moves into each gap
            if tokens[i] is None:
                moved = batch.pool.leave(i)
                if moved >= 0:
                    batch.rows[i], tokens[i] = batch.rows[moved], tokens[moved]
                batch.rows.pop()
                tokens.pop()
        if batch.rows:
            if batch.pool.length >= block_size:  # every row still cached has padding to give back
                batch.pool.compact()
            idx = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
            view = batch.pool.view()
            batch.logits = next_token_logits(self.model, idx, cache=view, vocab_limit=self.vocab_limit)
            batch.pool.length = view.length
        else:
            batch.logits = None
        batch.sliding = sliding + slide
        if batch.sliding:
            windows = torch.tensor([(row.seq.prompt + row.seq.generated)[-block_size:] for row in batch.sliding],
                                   dtype=torch.long, device=self.device)  # (B', block_size)
            batch.slide_logits = next_token_logits(self.model, windows, vocab_limit=self.vocab_limit)

    def _sample(self, row: _Row, logits: torch.Tensor, i: int) -> int | None:
        """Sample row `row`'s next token from logits[i] and deliver it; None when the row is done."""
        s = row.seq.sampling
        if row.seq.cancelled:
            return None
        token = int(sample_next(logits[i:i + 1], s.temperature, s.top_k, s.top_p, row.generator)[0])
        row.seq.generated.append(token)
        if token == self.eos_id:  # a token like any other in logprobs and usage, but no text
            piece, finish = row.text.finish(), "stop"
        else:
            piece = row.text.push(token)
            finish = "stop" if row.text.stopped else "length" if len(row.seq.generated) >= s.max_tokens else None
            if finish == "length":
                piece += row.text.finish()
        info = TokenInfo(token, self.tokenizer.decode([token]) if s.logprobs is not None else "")
        if s.logprobs is not None:
            logp = torch.log_softmax(logits[i].float(), dim=-1)
            info.logprob, info.top = float(logp[token]), self._top(logp, s.logprobs)
        row.seq.deliver(("token", info, piece))
        if finish is not None:
            row.end(("done", finish))
            return None
        return token


class _Batch:
    """The loop's rows: those in the shared cache (with their next logits), then those decoding
    on a sliding window past the context (with theirs)."""

    def __init__(self) -> None:
        self.rows: list[_Row] = []  # row i of `pool` is rows[i]
        self.pool: BatchCache | None = None
        self.logits: torch.Tensor | None = None  # (len(rows), V)
        self.sliding: list[_Row] = []
        self.slide_logits: torch.Tensor | None = None  # (len(sliding), V)

    @property
    def size(self) -> int:
        return len(self.rows) + len(self.sliding)
