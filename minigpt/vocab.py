"""Growing a model's vocabulary: added special tokens and resized embeddings.

    tokenizer.add_special_tokens(["<|startoftext|>", "<|pad|>"])   # ids 50257, 50258
    resize_token_embeddings(model, tokenizer.vocab_size)           # or: add_tokens(model, tokenizer, [...])

New rows start at the mean of the existing embeddings. With a tied head the new token's
logit is then <h, mean_i e_i> = mean_i <h, e_i>, the average of the existing logits, so
its initial probability sits inside the range of the existing tokens' instead of
dominating or vanishing (as a random row of the wrong norm can make it), and the model's
distribution over old tokens barely moves (Hewitt 2021, "Initializing New Word Embeddings
for Pretrained Language Models"). Old rows are kept bit for bit.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


@torch.no_grad()
def resize_token_embeddings(model: nn.Module, new_vocab_size: int, mean_of: int | None = None) -> nn.Module:
    """Give `model` (a GPT) `new_vocab_size` token rows, in place; returns it.

    Rows 0..old-1 are copied unchanged; new rows (and the head's, when untied) are set to
    the mean of rows 0..mean_of-1 (default: all old rows). Pass the tokenizer's vocabulary
    size as `mean_of` when the model's vocab_size is padded (e.g. 50304), so the untrained
    padding rows do not enter the mean. The config's vocab_size follows; dtype, device and
    requires_grad are kept.

    Raises ValueError when shrinking (that would drop trained rows) or when mean_of is out
    of range.
    """
    old = model.config.vocab_size
    mean_of = old if mean_of is None else mean_of
    if new_vocab_size < old:
        raise ValueError(f"new_vocab_size={new_vocab_size} is below the model's vocab_size={old}; "
                         f"shrinking would drop trained rows (only growing is supported)")
    if not 0 < mean_of <= old:
        raise ValueError(f"mean_of={mean_of} must be in 1..{old} (the rows to average)")
    if new_vocab_size == old:
        return model
    tied = model.lm_head.weight is model.tok_emb.weight
    model.tok_emb = _grown_embedding(model.tok_emb, new_vocab_size, mean_of)
    if tied:
        model.lm_head.weight = model.tok_emb.weight
    else:
        model.lm_head = _grown_linear(model.lm_head, new_vocab_size, mean_of)
    model.config = model.config.replace(vocab_size=new_vocab_size)
    log.info("resized token embeddings from %d to %d rows (new rows: mean of the first %d)",
             old, new_vocab_size, mean_of)
    return model


def _grown_rows(weight: torch.Tensor, rows: int, mean_of: int) -> torch.Tensor:
    old = weight.shape[0]
    grown = torch.empty(rows, *weight.shape[1:], dtype=weight.dtype, device=weight.device)
    grown[:old] = weight
    grown[old:] = weight[:mean_of].float().mean(0).to(weight.dtype)
    return grown


def _grown_embedding(emb: nn.Embedding, rows: int, mean_of: int) -> nn.Embedding:
    out = nn.Embedding(rows, emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
    out.weight = nn.Parameter(_grown_rows(emb.weight, rows, mean_of), requires_grad=emb.weight.requires_grad)
    return out


def _grown_linear(linear: nn.Linear, rows: int, mean_of: int) -> nn.Linear:
    out = type(linear)(linear.in_features, rows, bias=linear.bias is not None,
                       device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight = nn.Parameter(_grown_rows(linear.weight, rows, mean_of), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        out.bias = nn.Parameter(_grown_rows(linear.bias, rows, mean_of), requires_grad=linear.bias.requires_grad)
    return out


@torch.no_grad()
def add_tokens(model: nn.Module, tokenizer, tokens: Sequence[str]) -> list[str]:
    """Add special `tokens` to `tokenizer` and make `model` fit it; return the tokens that were new.

    When the model already has rows for the new ids (a vocab_size padded beyond the
    tokenizer's, e.g. 50304), those padding rows are reused and set to the mean of the
    tokenizer's real rows, as resize_token_embeddings sets new rows; otherwise the model
    grows to the tokenizer's vocabulary. Tokens already present change nothing.
    """
    real = tokenizer.vocab_size
    new = tokenizer.add_special_tokens(tokens)
    if not new:
        return new
    needed = tokenizer.vocab_size
    have = model.config.vocab_size
    if have >= needed:
        ids = range(real, needed)
        weights = [model.tok_emb.weight]
        if model.lm_head.weight is not model.tok_emb.weight:
            weights.append(model.lm_head.weight)
        for w in weights:
            w[ids.start : ids.stop] = w[:real].float().mean(0).to(w.dtype)
        log.info("added tokens %s as ids %d..%d, reusing the model's padding rows (vocab_size=%d)",
                 new, ids.start, ids.stop - 1, have)
    else:
        resize_token_embeddings(model, needed, mean_of=min(real, have))
        log.info("added tokens %s as ids %d..%d", new, real, needed - 1)
    return new
