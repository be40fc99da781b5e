"""Autoregressive generation: sampling, the KV-cache loop, and text-level helpers.

Prompts of different lengths are left-padded into one batch; the model gets each row's
padding so positions start at 0 for every prompt and padding is never attended to.
With the cache on, each step feeds one token per row; once the sequence reaches
block_size the loop crops to the last block_size tokens and recomputes (as it does with
the cache off), so both paths give identical greedy output.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

PromptLike = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
    check_sampler(temperature, top_k, top_p)


def check_sampler(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """The sampler's settings, checked where they enter (`sample_next`, so the server's
    engine and every generator too): NaN and infinity are refused, not turned into a torch error."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 and finite (0 means greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer or None")
    if top_p is not None and not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p} must be a finite number in (0, 1], or None (no nucleus cut)")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from (B, V) logits. temperature=0 is greedy (argmax).
    Raises ValueError for settings no sampler can take (see `check_sampler`)."""
    check_sampler(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens whose
        # probability reaches top_p; the most likely token is always kept.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _as_rows(prompts: PromptLike) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise ValueError(f"prompt tensor must be (batch, seq); got shape {tuple(prompts.shape)}")
        return prompts.tolist()
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    rows = [list(p) for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    return rows


def next_token_logits(model, idx: torch.Tensor, *, cache=None, left_pad: torch.Tensor | None = None,
                      vocab_limit: int | None = None) -> torch.Tensor:
    """(B, V) logits of the token after each row of `idx`, only the newest position through
    the head, in float32 whatever the model's dtype (sampling reads them in full precision);
    ids from `vocab_limit` on get -inf, so a model with more rows than its tokenizer never
    picks one the tokenizer cannot decode."""
    h = model.hidden(idx, cache=cache, left_pad=left_pad)[0][:, -1]  # (B, C): only the newest position
    return mask_undecodable(model.lm_head(h).float(), vocab_limit)  # (B, V)


def mask_undecodable(logits: torch.Tensor, vocab_limit: int | None) -> torch.Tensor:
    """`logits` (..., V) with -inf, in place, for the ids from `vocab_limit` on: those a
    tokenizer smaller than the model's vocabulary cannot decode."""
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[..., vocab_limit:] = float("-inf")
    return logits


def stream_tokens(
    model,
    prompts: PromptLike,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    vocab_limit: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) ids, one step at a time.

    Rows that produced `eos_id` keep yielding `eos_id`; the loop ends when every row has
    finished or after max_new_tokens steps. `vocab_limit`: sample only ids below it (the text
    helpers pass the tokenizer's vocabulary, so a model with more rows than its tokenizer, such
    as the char recipe's 65 trained on text of fewer characters or a vocabulary padded to 50304,
    never produces an id that cannot be decoded). The arguments are checked when this is called,
    not at the first token, so a caller (the CLI printing the prompt) hears of a bad one
    before it has done anything.
    """
    _check_sampling(temperature, top_k, top_p, max_new_tokens)
    config = model.config
    rows = _as_rows(prompts)
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty; give at least one token (e.g. the eos id)")
        if len(row) > config.block_size:
            raise ValueError(
                f"prompt {i} has {len(row)} tokens, more than block_size={config.block_size}; "
                f"shorten it or keep its last {config.block_size} tokens"
            )
        bad = [t for t in row if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} is out of range for vocab_size={config.vocab_size}; "
                             f"was it encoded with this model's tokenizer?")
    return _stream_tokens(model, rows, max_new_tokens, temperature, top_k, top_p, seed, eos_id, use_cache,
                          vocab_limit)


def _stream_tokens(model, rows: list[list[int]], max_new_tokens: int, temperature: float, top_k: int | None,
                   top_p: float | None, seed: int | None, eos_id: int | None,
                   use_cache: bool, vocab_limit: int | None = None) -> Iterator[torch.Tensor]:
    config = model.config
    device = model.lm_head.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    longest = max(len(r) for r in rows)
    pad_counts = [longest - len(r) for r in rows]
    fill = rows[0][0]  # any valid id: padding is masked out
    seq = torch.tensor([[fill] * p + r for p, r in zip(pad_counts, rows)], dtype=torch.long, device=device)
    left_pad = torch.tensor(pad_counts, device=device) if any(pad_counts) else None
    finished = torch.zeros(len(rows), dtype=torch.bool, device=device)

    def next_logits(idx: torch.Tensor, **kwargs) -> torch.Tensor:
        return next_token_logits(model, idx, vocab_limit=vocab_limit, **kwargs)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            cache = model.new_cache(len(rows), left_pad) if use_cache else None
            logits = next_logits(seq, cache=cache, left_pad=None if use_cache else left_pad)
            for step in range(max_new_tokens):
                token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
                if eos_id is not None:
                    token = torch.where(finished, torch.full_like(token, eos_id), token)
                    finished |= token == eos_id
                yield token
                if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                    return
                seq = torch.cat([seq, token[:, None]], dim=1)
                if cache is not None and cache.length < config.block_size:
                    logits = next_logits(token[:, None], cache=cache)
                    continue
                # The context is full: slide a block_size window and recompute without cache.
                cache = None
                cut = max(0, seq.shape[1] - config.block_size)
                window_pad = None if left_pad is None else (left_pad - cut).clamp(min=0)
                logits = next_logits(seq[:, cut:], left_pad=window_pad)
    finally:
        model.train(was_training)


def generate(model, prompts: PromptLike, max_new_tokens: int, **kwargs) -> list[list[int]]:
    """Generate up to `max_new_tokens` per prompt; return the new tokens of each row.

    Keyword arguments are those of `stream_tokens` (temperature, top_k, top_p, seed,
    eos_id, use_cache). A row stops at `eos_id`, which is not included in its output.
    """
    eos_id = kwargs.get("eos_id")
    rows = _as_rows(prompts)
    out: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    for token in stream_tokens(model, rows, max_new_tokens, **kwargs):
        for i, t in enumerate(token.tolist()):
            if done[i]:
                continue
            if eos_id is not None and t == eos_id:
                done[i] = True
            else:
                out[i].append(t)
    return out


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stop if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def stream_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    stop: Sequence[str] = (),
    **kwargs,
) -> Iterator[str]:
    """Yield pieces of the completion of one text prompt as they are produced.

    Stops at the tokenizer's eos or at the first stop string (which is not yielded).
    Text that could still turn into a stop string, or an incomplete UTF-8 character,
    is held back until it is certain. The prompt, stop strings and sampling settings are
    checked when this is called (ValueError), before the first token.
    """
    kwargs.setdefault("eos_id", tokenizer.eos_id)
    kwargs.setdefault("vocab_limit", tokenizer.vocab_size)
    stop = _check_stops(stop)
    tokens = stream_tokens(model, [_encode_prompt(tokenizer, prompt)], max_new_tokens, **kwargs)
    return _stream_text(tokens, tokenizer, stop, kwargs["eos_id"])


class TextStream:
    """The text of a growing list of token ids, given out piece by piece as it becomes
    certain: text that could still turn into a stop string, or an incomplete UTF-8
    character, is held back; the first stop string ends the text (it is not included).

    `push(id)` returns the newly certain piece ("" if none); `stopped` says a stop string
    was hit; `finish()` returns what was held back. `text` is everything given out so far.
    """

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        # Decoding every id at every token would be quadratic: ids[:_fixed] decode to _fixed_text,
        # which ends on a whole character, so the whole text is _fixed_text + decode(ids[_fixed:]).
        self._fixed, self._fixed_text = 0, ""

    def _decode(self) -> str:
        tail = self.tokenizer.decode(self.ids[self._fixed:])
        full = self._fixed_text + tail
        if len(self.ids) - self._fixed >= 32 and not tail.endswith("\ufffd"):
            self._fixed, self._fixed_text = len(self.ids), full
        return full

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        full, self.stopped = _cut_at_stop(self._decode(), self.stop)
        safe = len(full) if self.stopped else len(full) - self._hold
        while not self.stopped and safe > len(self.text) and full[safe - 1] == "\ufffd":  # a split character
            safe -= 1
        return self._give(full, safe)

    def finish(self) -> str:
        full, _ = _cut_at_stop(self._decode(), self.stop)
        return self._give(full, len(full))

    def _give(self, full: str, upto: int) -> str:
        if upto <= len(self.text):
            return ""
        piece = full[len(self.text):upto]
        self.text = full[:upto]
        return piece


def _stream_text(tokens: Iterator[torch.Tensor], tokenizer, stop: list[str], eos_id: int | None) -> Iterator[str]:
    text = TextStream(tokenizer, stop)
    for token in tokens:
        t = int(token[0])
        if t == eos_id:
            break
        piece = text.push(t)
        if piece:
            yield piece
        if text.stopped:
            return
    piece = text.finish()
    if piece:
        yield piece


def _check_stops(stop: Sequence[str]) -> list[str]:
    """`stop` as a list; an empty stop string (it would match before every token) is a ValueError."""
    if isinstance(stop, str):
        stop = [stop]
    stop = list(stop)
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop={stop!r}: a stop string must be non-empty text (an empty one matches everywhere); "
                         f"drop it, or give the text to stop at, e.g. --stop $'\\n'")
    return stop


def _encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The ids of a text prompt; an empty one is a ValueError saying what to give instead."""
    ids = tokenizer.encode(prompt)
    if not ids:
        eos = getattr(tokenizer, "eos_id", None)
        start = f"the tokenizer's end-of-text token {tokenizer.decode([eos])!r}" if eos is not None else "a newline"
        raise ValueError(f"prompt={prompt!r} is empty: there is nothing to continue; give some text, or for an "
                         f"unconditional sample start from {start}")
    return ids


def generate_text(
    model,
    tokenizer,
    prompts: str | Sequence[str],
    max_new_tokens: int,
    *,
    stop: Sequence[str] = (),
    **kwargs,
) -> list[str]:
    """Complete one or several text prompts (batched); cut each at eos or a stop string."""
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    kwargs.setdefault("eos_id", tokenizer.eos_id)
    kwargs.setdefault("vocab_limit", tokenizer.vocab_size)
    stop = _check_stops(stop)
    ids = generate(model, [_encode_prompt(tokenizer, t) for t in texts], max_new_tokens, **kwargs)
    return [_cut_at_stop(tokenizer.decode(row), stop)[0] for row in ids]
