"""The logit lens: what each layer would predict if the model stopped there.

nostalgebraist (2020, "interpreting GPT: the logit lens") reads the residual stream after
every block through the model's own final LayerNorm and unembedding. In minigpt terms,
for the n_layer + 1 hidden states of `GPT.forward(..., output_hidden_states=True)`:

    lens[0]        = lm_head(ln_f(embeddings))              the stream entering block 0
    lens[i]        = lm_head(ln_f(output of block i-1))     1 <= i < n_layer
    lens[n_layer]  = lm_head(hidden_states[-1])             already normed: the model's logits

The last reading is therefore exactly the model's own next-token distribution.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from minigpt.model import GPT


def lens_labels(n_layer: int) -> list[str]:
    """Names of the n_layer + 1 readings, in order."""
    return ["embeddings", *(f"after block {i}" for i in range(n_layer - 1)), f"after block {n_layer - 1} = output"]


@torch.no_grad()
def lens_logits(model: GPT, idx: torch.Tensor, position: int | None = None) -> torch.Tensor:
    """Logits read from every layer's residual stream.

    idx: (B, T) token ids. Returns (n_layer + 1, B, T, V), or (n_layer + 1, B, V) at one
    `position` (negative counts from the end). Raises ValueError for a position outside
    the sequence (and whatever `GPT.forward` raises for bad ids).
    """
    return torch.stack(list(iter_lens_logits(model, idx, position)))  # (L+1, B, [T,] V)


@torch.no_grad()
def iter_lens_logits(model: GPT, idx: torch.Tensor, position: int | None = None) -> Iterator[torch.Tensor]:
    """`lens_logits` one reading at a time, (B, [T,] V) float32 each: n_layer + 1 of them
    together would hold (n_layer + 1) x T x V values (360 MB for 256 tokens of a GPT-2)."""
    states = model(idx, output_hidden_states=True).hidden_states  # n_layer + 1 x (B, T, C)
    if position is not None:
        T = idx.shape[1]
        if not -T <= position < T:
            raise ValueError(f"position={position} is outside the prompt of {T} tokens; use -{T} .. {T - 1}")
        states = tuple(h[:, position] for h in states)  # n_layer + 1 x (B, C)
    # hidden_states[:-1] are residual streams before ln_f; the last one already went through it.
    for i, h in enumerate(states):
        yield model.lm_head(h if i == len(states) - 1 else model.ln_f(h)).float()


@dataclass
class LensTable:
    """Top-k next tokens per layer at one position of one prompt."""

    prompt_tokens: list[str]
    """The prompt, one decoded string per token."""
    position: int
    """The position read (0-based, non-negative); the prediction is for the token after it."""
    layers: list[str]
    """Reading names, see `lens_labels`."""
    top_tokens: list[list[str]]
    """(n_layer + 1, k) decoded top tokens per reading."""
    top_probs: list[list[float]]
    """(n_layer + 1, k) their probabilities."""


def logit_lens(model: GPT, tokenizer, prompt: str, top_k: int = 5, position: int = -1) -> LensTable:
    """Top-`top_k` next tokens of every layer at `position` of `prompt`.

    Raises ValueError for an empty prompt, top_k < 1 or a position outside the prompt.
    """
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("prompt has no tokens; give at least one character")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} must be a positive integer")
    device = model.lm_head.weight.device
    logits = lens_logits(model, torch.tensor([ids], device=device), position)[:, 0]  # (L+1, V)
    probs, top = torch.softmax(logits, dim=-1).topk(min(top_k, logits.shape[-1]), dim=-1)  # (L+1, k) x 2
    return LensTable(
        prompt_tokens=[tokenizer.decode([i]) for i in ids],
        position=position % len(ids),
        layers=lens_labels(model.config.n_layer),
        top_tokens=[[tokenizer.decode([i]) for i in row] for row in top.tolist()],
        top_probs=probs.tolist(),
    )


def format_lens(table: LensTable) -> str:
    """The lens as a terminal table: one row per layer, the top tokens left to right."""
    from minigpt.report import text_table

    seen = "".join(table.prompt_tokens[: table.position + 1])
    k = len(table.top_tokens[0])
    rows = [["layer", *(f"top {j + 1}" for j in range(k))]]
    for name, tokens, probs in zip(table.layers, table.top_tokens, table.top_probs):
        rows.append([name, *(f"{t!r} {_percent(p)}" for t, p in zip(tokens, probs))])
    header = f"logit lens: next token after {seen!r} (position {table.position}), top {k} per layer"
    return "\n".join([header, "", *text_table(rows, right=set())])


def _percent(p: float) -> str:
    return f"{p:.1%}" if p >= 0.001 else "<0.1%"


def lens_report(model_dir: str, prompt: str, top_k: int = 5, position: int = -1,
                device: str = "cpu", as_json: bool = False) -> str:
    """What ``minigpt logit-lens`` prints: load the model folder and its tokenizer, run the lens."""
    from minigpt.tokenizer import load_tokenizer

    model = GPT.from_pretrained(model_dir).to(device).eval()
    table = logit_lens(model, load_tokenizer(model_dir), prompt, top_k, position)
    return json.dumps(asdict(table), indent=2) if as_json else format_lens(table)
