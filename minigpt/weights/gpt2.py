"""GPT-2 in the Hugging Face layout (``GPT2LMHeadModel``): config and tensor-name map.

GPT-2 stores its projections as ``Conv1D`` weights of shape (in, out), the transpose of
``nn.Linear``'s (out, in), so every matrix except the embeddings is transposed.
"""
from __future__ import annotations

import re

import torch

from minigpt.config import GPTConfig
from minigpt.weights.common import ACTIVATION_FROM_HF, ACTIVATION_TO_HF, check_hf_options, gpt2_special_tokens, take

MODEL_TYPE = "gpt2"

# HF block tensor -> (minigpt block tensor, transpose?)
_BLOCK_MAP = {
    "ln_1.weight": ("ln_1.weight", False),
    "ln_1.bias": ("ln_1.bias", False),
    "attn.c_attn.weight": ("attn.qkv.weight", True),
    "attn.c_attn.bias": ("attn.qkv.bias", False),
    "attn.c_proj.weight": ("attn.proj.weight", True),
    "attn.c_proj.bias": ("attn.proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False),
    "ln_2.bias": ("ln_2.bias", False),
    "mlp.c_fc.weight": ("mlp.fc.weight", True),
    "mlp.c_fc.bias": ("mlp.fc.bias", False),
    "mlp.c_proj.weight": ("mlp.proj.weight", True),
    "mlp.c_proj.bias": ("mlp.proj.bias", False),
}
# Causal-mask buffers that old checkpoints saved; minigpt builds its masks itself.
DROPPED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")

# config.json keys without which the shape is unknown (the rest have defaults).
REQUIRED_KEYS = ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd")


def config_from_hf(hf: dict) -> GPTConfig:
    check_hf_options(hf, MODEL_TYPE, {
        "activation_function": tuple(ACTIVATION_FROM_HF),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "reorder_and_upcast_attn": (False,),
        "tie_word_embeddings": (True,),
    })
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        n_inner=hf.get("n_inner"),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=ACTIVATION_FROM_HF[hf.get("activation_function", "gelu_new")],
    )


def unrepresentable(config: GPTConfig) -> list[str]:
    """Why `config` cannot be saved as GPT-2 (empty when it can)."""
    reasons = []
    if set(config.layer_kinds) != {"dense"}:
        reasons.append("GPT-2 has no banded layers")
    if config.attention_scale is not None:
        reasons.append("GPT-2 always scales attention by 1/sqrt(head_dim)")
    if not (config.bias and config.qkv_bias and config.tie_embeddings):
        reasons.append("GPT-2 has all biases and a tied head")
    return reasons


def config_to_hf(config: GPTConfig) -> dict:
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "activation_function": ACTIVATION_TO_HF[config.activation],
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        **gpt2_special_tokens(config),
    }


def block_to_minigpt(source: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One block's HF tensors (names under `prefix`, consumed) -> minigpt names within the block."""
    out = {}
    for hf_name, (name, transpose) in _BLOCK_MAP.items():
        t = take(source, prefix + hf_name)
        out[name] = t.t() if transpose else t
    return out


def block_from_minigpt(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One block's minigpt tensors (names under `prefix`) -> HF names within the block."""
    out = {}
    for hf_name, (name, transpose) in _BLOCK_MAP.items():
        t = state[prefix + name]
        out[hf_name] = t.t() if transpose else t
    return out
