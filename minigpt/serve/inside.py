"""What the playground's inside view shows, as plain JSON: one layer's attention pattern per
head, the logit lens at every position, and the model card, for one text.

Built on the hook points (`minigpt.attention_map.attention_maps` reads `hook_pattern`, the
math path's probabilities; `minigpt.lens.lens_logits` reads the residual stream), so the
page (through `POST /v1/inspect`) and a notebook (calling `inside_view`) get the same data:

    from minigpt.serve.inside import inside_view
    view = inside_view(model, tokenizer, tokenizer.encode("ROMEO:"), layer=1)
    view["attention"][head][query][key]        # a probability; 0 outside the layer's band
"""
from __future__ import annotations

from typing import Any

import torch

from minigpt.attention_map import attention_maps, layer_kind
from minigpt.lens import iter_lens_logits, lens_labels


def model_card(model, source: str, tokenizer) -> dict[str, Any]:
    """The facts a reader wants beside the insides: size, shape, attention pattern, origin."""
    c = model.config
    return {
        "source": source, "parameters": model.num_params(), "n_layer": c.n_layer, "n_head": c.n_head,
        "n_embd": c.n_embd, "head_dim": c.head_dim, "context": c.block_size, "vocab_size": c.vocab_size,
        "layers": [layer_kind(c, i) for i in range(c.n_layer)], "tokenizer": getattr(tokenizer, "name", "?"),
    }


@torch.no_grad()
def inside_view(model, tokenizer, ids: list[int], layer: int = 0, decimals: int = 5) -> dict[str, Any]:
    """The inside view of `ids` (1 to block_size token ids) at `layer`.

    Returns {"tokens": [T strings], "layer": layer, "kind": "dense" | "banded w=..",
    "attention": (H, T, T) nested lists (query rows, key columns; rounded to `decimals`),
    "lens": {"layers": [L+1 names], "tokens": (L+1, T) top token read at each position,
    "probs": (L+1, T) its probability}}. The lens at position t is the prediction of the
    token after t, read after each block through the final LayerNorm and the head (the
    last row is the model's own prediction). Raises ValueError for a layer out of range or
    ids the model cannot take.
    """
    config = model.config
    if not 1 <= len(ids) <= config.block_size:
        raise ValueError(f"the text has {len(ids)} tokens; the inside view takes 1 to {config.block_size} "
                         f"(the model's context)")
    if not 0 <= layer < config.n_layer:
        raise ValueError(f"layer={layer} is out of range: this model has layers 0..{config.n_layer - 1}")
    tokens = [tokenizer.decode([t]) for t in ids]
    maps = attention_maps(model, ids, tokens, layers=[layer])
    idx = torch.tensor([ids], device=model.lm_head.weight.device)
    top_tokens, top_probs = [], []
    for logits in iter_lens_logits(model, idx):  # (1, T, V), one reading at a time
        best, which = torch.softmax(logits[0], dim=-1).max(dim=-1)
        top_tokens.append([tokenizer.decode([t]) for t in which.tolist()])
        top_probs.append([round(p, 4) for p in best.tolist()])
    return {
        "tokens": tokens, "layer": layer, "kind": maps.kinds[0],
        "attention": [[[round(p, decimals) for p in row] for row in head] for head in maps.probs[0].tolist()],
        "lens": {"layers": lens_labels(config.n_layer), "tokens": top_tokens, "probs": top_probs},
    }
