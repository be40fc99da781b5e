"""Builders shared by the fine-tuning tests."""
from __future__ import annotations

import torch

from minigpt import GPT, GPTConfig


def bigram_gpt(pairs, tokenizer, n_embd=16):
    """A real GPT whose blocks add nothing (output projections zero) and whose positions
    are zero, so its next-token logits are LN(e_current) . e_next: a bigram model. Each
    (cue word, label word) pair shares one embedding direction, so after the cue the label
    is far more likely than anything else. Different pairs use orthogonal directions."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=128, n_layer=1, n_head=2, n_embd=n_embd)).eval()
    with torch.no_grad():
        model.pos_emb.weight.zero_()
        for block in model.blocks:
            for linear in (block.attn.proj, block.mlp.proj):
                linear.weight.zero_()
                linear.bias.zero_()
        for i, (cue, label) in enumerate(pairs):
            direction = torch.zeros(n_embd)
            direction[2 * i], direction[2 * i + 1] = 4.0, -4.0  # zero mean: LayerNorm keeps its direction
            for word, scale in ((cue, 1.0), (label, 2.0)):  # the label outscores the cue itself
                (token,) = tokenizer.encode(word)
                model.tok_emb.weight[token] = scale * direction
    return model
