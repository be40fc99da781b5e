"""Log-likelihoods of continuations, batched, with each context encoded once.

A request is a context and the continuations to score after it (a multiple-choice
example's choices). The straightforward way, lm-evaluation-harness's, encodes context +
continuation as one sequence per choice, so a 4-choice example encodes its context four
times. Here the contexts of a batch are left-padded and run once, filling a KV cache. Then
continuation j of every context runs on that cache (right-padded, one batch) and the cache
forgets it (`KVCache.truncate`), for j = 1, 2, ...; when a banded layer's ring would wrap
(context + continuation longer than its window) the cache is instead copied once per
continuation (`KVCache.select`) and all continuations run in one batch. The context's last
position predicts each continuation's first token, so a continuation of n tokens costs
n - 1 positions. The uncached path (`use_cache=False`) is kept as the slow twin that the
tests and the benchmark compare with.

A context too long for the model is cut from the left for each continuation by
lm-evaluation-harness's rule: context + continuation keep their last block_size + 1
tokens (the last continuation token is never an input), so a continuation of n tokens sees
the last block_size + 1 - n context tokens. Choices of different lengths can so see
different contexts; each distinct cut is scored as its own request.

For continuation tokens c_1..c_n after context x the score is
    log p(c | x) = sum_j log p(c_j | x, c_<j),
and the continuation is "greedy" when every c_j is the argmax of its distribution, i.e.
greedy decoding from x would have produced c (lm-evaluation-harness's `is_greedy`).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

Request = tuple[Sequence[int], Sequence[Sequence[int]]]
"""(context token ids, [continuation token ids, ...])."""


@dataclass(frozen=True)
class Scored:
    """One continuation's per-token log-probabilities."""

    logprobs: tuple[float, ...]
    greedy: bool
    """Every token was the most likely one given the context and the tokens before it."""

    @property
    def total(self) -> float:
        return sum(self.logprobs)


def _fitted(context: Sequence[int], continuation: Sequence[int], block_size: int) -> tuple[int, ...]:
    """The context as lm-evaluation-harness cuts it for this continuation: the end of
    context + continuation, block_size + 1 tokens, keeps its last block_size + 1 - n
    context tokens (the end of the context is what conditions the answer)."""
    if not context or len(continuation) == 0:
        raise ValueError("the context and every continuation need at least one token")
    room = block_size + 1 - len(continuation)
    if room < 1:
        raise ValueError(f"a continuation of {len(continuation)} tokens leaves no room for its context in "
                         f"block_size={block_size}; shorten the choices")
    return tuple(context[-room:])


def _split_by_cut(requests: Sequence[Request], block_size: int) -> tuple[list[Request], list[list[tuple[int, int]]]]:
    """The requests with contexts cut per continuation (`_fitted`), one request per distinct
    cut; and for each original request, where each continuation went: (request, index)."""
    fitted: list[Request] = []
    where: list[list[tuple[int, int]]] = []
    for context, continuations in requests:
        groups: dict[tuple[int, ...], int] = {}
        spots = []
        for cont in continuations:
            cut = _fitted(context, cont, block_size)
            if cut not in groups:
                groups[cut] = len(fitted)
                fitted.append((list(cut), []))
            spots.append((groups[cut], len(fitted[groups[cut]][1])))
            fitted[groups[cut]][1].append(list(cont))
        where.append(spots)
    return fitted, where


def _score_rows(model, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of `targets` (N,) under the head applied to hidden (N, C), and
    whether each target is the argmax. Only the N positions that are scored reach the head."""
    logp = F.log_softmax(model.lm_head(hidden).float(), dim=-1)  # (N, V)
    return logp.gather(1, targets[:, None])[:, 0], logp.argmax(-1) == targets


def _pad_right(rows: Sequence[Sequence[int]], device) -> torch.Tensor:
    T = max(1, max(len(r) for r in rows))
    out = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


def _collect(per_row: list[list[tuple[float, bool]]], counts: Sequence[int]) -> list[list[Scored]]:
    out, i = [], 0
    for n in counts:
        out.append([Scored(tuple(lp for lp, _ in row), all(g for _, g in row)) for row in per_row[i : i + n]])
        i += n
    return out


def _batch_cached(model, batch: list[Request]) -> list[list[Scored]]:
    device = model.lm_head.weight.device
    contexts = [list(c) for c, _ in batch]
    conts = [list(c) for _, cs in batch for c in cs]
    counts = [len(cs) for _, cs in batch]
    L = max(map(len, contexts))
    longest = max(map(len, conts))
    if len(batch) > 1 and L + longest - 1 > model.config.block_size:  # padding made a row too long
        return [s for r in batch for s in _batch_cached(model, [r])]
    pads = [L - len(c) for c in contexts]
    idx = torch.tensor([[c[0]] * p + c for p, c in zip(pads, contexts)], device=device)  # (B, L)
    left_pad = torch.tensor(pads, device=device) if any(pads) else None
    cache = model.new_cache(len(batch), left_pad, max_length=L + longest - 1)
    last = model.hidden(idx, cache=cache)[0][:, -1]  # (B, C): predicts each first token
    rows = torch.repeat_interleave(torch.arange(len(batch), device=device), torch.tensor(counts, device=device))
    # Scored positions are gathered from every pass and go through the head together.
    hidden, targets = [last.index_select(0, rows)], [torch.tensor([c[0] for c in conts], device=device)]
    owners = list(range(len(conts)))
    windows = [model.config.layer_window(i) for i in range(model.config.n_layer)]
    if longest > 1 and all(w is None or w >= L + longest - 1 for w in windows):
        # Continuation j of every context runs on the context's cache, which then forgets it
        # (no banded ring wraps, so no context token is overwritten): the cache is never
        # copied. A context with fewer continuations runs its last one again, unscored.
        first_row = [sum(counts[:b]) for b in range(len(counts))]
        for j in range(max(counts)):
            picks = [first_row[b] + min(j, n - 1) for b, n in enumerate(counts)]
            _continue(model, cache, [conts[r] for r in picks], [r if j < n else None for r, n in zip(picks, counts)],
                      hidden, targets, owners)
            cache.truncate(L)
    elif longest > 1:
        # A banded layer's ring would wrap: copy the cache once per continuation instead.
        _continue(model, cache.select(rows), conts, list(range(len(conts))), hidden, targets, owners)
    lp, greedy = _score_rows(model, torch.cat(hidden), torch.cat(targets))
    per_row: list[list[tuple[float, bool]]] = [[] for _ in conts]
    for r, a, g in zip(owners, lp.tolist(), greedy.tolist()):
        per_row[r].append((a, g))
    return _collect(per_row, counts)


def _continue(model, cache, conts: list[list[int]], row_owner: list[int | None], hidden: list, targets: list,
              owners: list) -> None:
    """Run continuations (one per cache row) after the cached context; append the hidden
    state of every position that predicts a continuation token, that token, and its owner
    (the continuation's index; None marks a filler row, which is not scored)."""
    device = model.lm_head.weight.device
    inp = _pad_right([c[:-1] for c in conts], device)  # (R, longest - 1): the last token predicts nothing
    h = model.hidden(inp, cache=cache)[0]  # (R, longest - 1, C)
    lengths = torch.tensor([len(c) - 1 if o is not None else 0 for c, o in zip(conts, row_owner)], device=device)
    valid = torch.arange(inp.shape[1], device=device)[None, :] < lengths[:, None]  # (R, longest - 1)
    hidden.append(h[valid])
    targets.append(_pad_right([c[1:] for c in conts], device)[valid])
    owners += [row_owner[i] for i in valid.nonzero()[:, 0].tolist()]


def _batch_uncached(model, batch: list[Request]) -> list[list[Scored]]:
    """The slow twin: one sequence per (context, continuation), right-padded, no cache."""
    device = model.lm_head.weight.device
    pairs = [(list(c), list(x)) for c, cs in batch for x in cs]
    idx = _pad_right([c + x[:-1] if len(x) > 1 else c for c, x in pairs], device)  # (R, T)
    h = model.hidden(idx)[0]  # (R, T, C)
    row_ids, positions, targets = [], [], []
    for r, (c, x) in enumerate(pairs):
        # The logits at position len(c) - 1 + j predict continuation token j.
        row_ids += [r] * len(x)
        positions += range(len(c) - 1, len(c) - 1 + len(x))
        targets += x
    rows_t = torch.tensor(row_ids, device=device)
    lp, greedy = _score_rows(model, h[rows_t, torch.tensor(positions, device=device)],
                             torch.tensor(targets, device=device))
    per_row: list[list[tuple[float, bool]]] = [[] for _ in pairs]
    for r, a, g in zip(row_ids, lp.tolist(), greedy.tolist()):
        per_row[r].append((a, g))
    return _collect(per_row, [len(cs) for _, cs in batch])


@torch.no_grad()
def score_continuations(model, requests: Sequence[Request], *, batch_size: int = 16, use_cache: bool = True,
                        progress: bool = False, desc: str = "scoring") -> list[list[Scored]]:
    """Per-token log-likelihoods of every continuation of every request.

    model: a GPT (its `hidden`, `lm_head` and `new_cache` are used), on any device and
    backend. requests: (context ids, [continuation ids, ...]); contexts too long for the
    block are cut from the left for each continuation, as lm-evaluation-harness cuts them
    (see the module docstring). batch_size counts contexts per forward pass.
    Returns, per request, one `Scored` per continuation, in order. Raises ValueError for an
    empty context or continuation, or a continuation that leaves no room for a context.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    requests = list(requests)
    fitted, where = _split_by_cut(requests, model.config.block_size)
    cut = sum(any(len(fitted[r][0]) < len(c) for r, _ in spots) for (c, _), spots in zip(requests, where))
    if cut:  # correct by the harness's convention, but it changes what K-shot means: say so
        log.warning("%d of %d contexts did not fit block_size=%d with their answers and were cut from the left "
                    "(their earliest tokens, first demonstrations included, are not seen); lower --shots to keep "
                    "them whole", cut, len(requests), model.config.block_size)
    # Longest first, so padding is small within a batch (and the first batch shows the peak memory).
    order = sorted(range(len(fitted)), key=lambda i: -(len(fitted[i][0]) + max(map(len, fitted[i][1]))))
    run = _batch_cached if use_cache else _batch_uncached
    results: list[list[Scored] | None] = [None] * len(fitted)
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        for s in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
            chunk = order[s : s + batch_size]
            for i, scored in zip(chunk, run(model, [fitted[i] for i in chunk])):
                results[i] = scored
    finally:
        model.train(was_training)
    return [[results[r][j] for r, j in spots] for spots in where]  # type: ignore[index]
