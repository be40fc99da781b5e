"""Parameter and FLOP counts computed from a config alone (a 175B config allocates nothing)."""
from __future__ import annotations

from minigpt.config import GPTConfig


def param_breakdown(config: GPTConfig) -> dict[str, int]:
    """Trainable parameters by component, mirroring the modules in `model.py`.

    Keys: tok_emb, pos_emb, per_block (one block), blocks (all of them), ln_f, lm_head
    (0 when tied to tok_emb).
    """
    C, V = config.n_embd, config.vocab_size
    ln = C * (2 if config.bias else 1)
    qkv = 3 * C * C + (3 * C if config.qkv_bias else 0)
    attn_proj = C * C + (C if config.bias else 0)
    fc = C * config.mlp_width + (config.mlp_width if config.bias else 0)
    mlp_proj = config.mlp_width * C + (C if config.bias else 0)
    per_block = 2 * ln + qkv + attn_proj + fc + mlp_proj
    return {
        "tok_emb": V * C,
        "pos_emb": config.block_size * C,
        "per_block": per_block,
        "blocks": config.n_layer * per_block,
        "ln_f": ln,
        "lm_head": 0 if config.tie_embeddings else V * C,
    }


def params(config: GPTConfig, non_embedding: bool = False) -> int:
    """Total trainable parameters; `non_embedding` leaves out the token and position tables."""
    parts = param_breakdown(config)
    total = parts["tok_emb"] + parts["pos_emb"] + parts["blocks"] + parts["ln_f"] + parts["lm_head"]
    if non_embedding:
        total -= parts["tok_emb"] + parts["pos_emb"]
    return total


def attention_context(config: GPTConfig, seq_len: int, layer: int) -> int:
    """How many keys a query of `layer` attends to, at most: T for dense, min(w, T) for banded."""
    window = config.layer_window(layer)
    return seq_len if window is None else min(window, seq_len)


def flops_per_token(config: GPTConfig, seq_len: int | None = None, training: bool = True) -> float:
    """Matmul FLOPs per token (Kaplan et al. 2020, section 2.1; PaLM appendix B convention).

    Forward: 2 FLOPs per non-embedding parameter (Kaplan's 2N; biases and norms
    included as they are there) and per LM-head weight plus, per layer, 4 * n_embd * context for QK^T and AV, where context is
    seq_len for dense layers and the band width for banded ones (the causal half is not
    subtracted, as in the usual MFU convention). Training is 3x forward (backward is 2x).
    """
    T = config.block_size if seq_len is None else seq_len
    weights = params(config, non_embedding=True)
    if config.tie_embeddings:  # the LM head is a matmul even when its weight is shared
        weights += config.vocab_size * config.n_embd
    forward = 2.0 * weights
    forward += sum(4.0 * config.n_embd * attention_context(config, T, i) for i in range(config.n_layer))
    return 3.0 * forward if training else forward
