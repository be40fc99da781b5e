"""GPT-Neo in the Hugging Face layout (``GPTNeoForCausalLM``): config and tensor-name map.

GPT-Neo differs from GPT-2 in three ways that are explicit config fields in minigpt:
layers alternate 'global' (dense) and 'local' (banded, ``window_size``) attention, the
softmax is not scaled by 1/sqrt(head_dim), and q/k/v have no biases. Its projections
are ``nn.Linear`` (no transpose); q, k and v are separate matrices that minigpt stacks
into one ``qkv`` projection.
"""
from __future__ import annotations

import re

import torch

from minigpt.config import GPTConfig
from minigpt.weights.common import ACTIVATION_FROM_HF, ACTIVATION_TO_HF, check_hf_options, gpt2_special_tokens, take

MODEL_TYPE = "gpt_neo"
_KIND = {"global": "dense", "local": "banded"}
_HF_KIND = {v: k for k, v in _KIND.items()}

_BLOCK_MAP = {
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "attn.attention.out_proj.weight": "attn.proj.weight",
    "attn.attention.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "ln_2.weight",
    "ln_2.bias": "ln_2.bias",
    "mlp.c_fc.weight": "mlp.fc.weight",
    "mlp.c_fc.bias": "mlp.fc.bias",
    "mlp.c_proj.weight": "mlp.proj.weight",
    "mlp.c_proj.bias": "mlp.proj.bias",
}
_QKV = ("q_proj", "k_proj", "v_proj")
DROPPED = re.compile(r"^h\.\d+\.attn\.attention\.(bias|masked_bias)$")


def _layer_kinds(hf: dict) -> list[str]:
    if "attention_layers" in hf and hf["attention_layers"]:
        names = list(hf["attention_layers"])
    elif "attention_types" not in hf:
        raise ValueError("gpt_neo config lacks both attention_layers and attention_types; one gives each "
                         "layer's kind ('global' or 'local')")
    else:  # attention_types = [[["global", "local"], 6]]
        names = [kind for pattern, reps in hf["attention_types"] for _ in range(reps) for kind in pattern]
    unknown = sorted(set(names) - set(_KIND))
    if unknown:
        raise ValueError(f"gpt_neo config: attention layer types {unknown} are not supported; use 'global' or 'local'")
    if len(names) != hf["num_layers"]:
        raise ValueError(f"gpt_neo config: {len(names)} attention layer types for num_layers={hf['num_layers']}")
    return [_KIND[n] for n in names]


def _shortest_period(kinds: list[str]) -> tuple[str, ...]:
    for p in range(1, len(kinds) + 1):
        if len(kinds) % p == 0 and kinds == kinds[:p] * (len(kinds) // p):
            return tuple(kinds[:p])
    return tuple(kinds)


# config.json keys without which the shape is unknown (the rest have defaults).
REQUIRED_KEYS = ("vocab_size", "max_position_embeddings", "num_layers", "num_heads", "hidden_size")


def config_from_hf(hf: dict) -> GPTConfig:
    check_hf_options(hf, MODEL_TYPE, {
        "activation_function": tuple(ACTIVATION_FROM_HF),
        "tie_word_embeddings": (True,),
    })
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=hf["num_layers"],
        n_head=hf["num_heads"],
        n_embd=hf["hidden_size"],
        n_inner=hf.get("intermediate_size"),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=ACTIVATION_FROM_HF[hf.get("activation_function", "gelu_new")],
        attention_pattern=_shortest_period(_layer_kinds(hf)),
        attention_window=hf.get("window_size", 256),
        attention_scale=1.0,
        qkv_bias=False,
    )


def unrepresentable(config: GPTConfig) -> list[str]:
    """Why `config` cannot be saved as GPT-Neo (empty when it can)."""
    reasons = []
    if config.attention_scale != 1.0:
        reasons.append("GPT-Neo does not scale attention (attention_scale must be 1.0)")
    if config.qkv_bias or not config.bias or not config.tie_embeddings:
        reasons.append("GPT-Neo has no q/k/v biases, all other biases and a tied head")
    return reasons


def config_to_hf(config: GPTConfig) -> dict:
    kinds = [_HF_KIND[k] for k in config.attention_pattern]
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["GPTNeoForCausalLM"],
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.block_size,
        "hidden_size": config.n_embd,
        "num_layers": config.n_layer,
        "num_heads": config.n_head,
        "intermediate_size": config.n_inner,
        "window_size": config.attention_window,
        "attention_types": [[kinds, config.n_layer // len(kinds)]],
        "activation_function": ACTIVATION_TO_HF[config.activation],
        "layer_norm_epsilon": config.layer_norm_eps,
        "embed_dropout": config.dropout,
        "attention_dropout": config.dropout,
        "resid_dropout": config.dropout,
        "tie_word_embeddings": True,
        **gpt2_special_tokens(config),
    }


def block_to_minigpt(source: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One block's HF tensors (names under `prefix`, consumed) -> minigpt names within the block."""
    qkv = [take(source, f"{prefix}attn.attention.{p}.weight") for p in _QKV]
    out = {"attn.qkv.weight": torch.cat(qkv, dim=0)}  # (3C, C)
    out.update({name: take(source, prefix + hf_name) for hf_name, name in _BLOCK_MAP.items()})
    return out


def block_from_minigpt(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One block's minigpt tensors (names under `prefix`) -> HF names within the block."""
    q, k, v = state[prefix + "attn.qkv.weight"].chunk(3, dim=0)
    out = {f"attn.attention.{p}.weight": t for p, t in zip(_QKV, (q, k, v))}
    out.update({hf_name: state[prefix + name] for hf_name, name in _BLOCK_MAP.items()})
    return out
