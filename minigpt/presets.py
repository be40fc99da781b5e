"""Named model shapes: the GPT-2, GPT-3 and GPT-Neo families and the main job's `tiny`.

Plain dictionaries of `GPTConfig` fields (`GPTConfig.from_preset(name)` builds one), with
the published tables they come from, which the tests and `minigpt inspect` compare against.
Pretraining recipes (a model plus how to train it) are in `minigpt/pretrain/recipes.py`.
"""
from __future__ import annotations

from typing import Any


def _gpt2(n_layer: int, n_head: int, n_embd: int) -> dict[str, Any]:
    return dict(vocab_size=50257, block_size=1024, n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def _gpt3(n_layer: int, n_embd: int, n_head: int) -> dict[str, Any]:
    # GPT-3 (Brown et al. 2020, section 2.1): GPT-2's architecture with context 2048 and
    # "alternating dense and locally banded sparse attention patterns". The paper does not
    # give the band width; we use 256, the value GPT-Neo adopted for the same design.
    return dict(
        vocab_size=50257,
        block_size=2048,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        attention_pattern=("dense", "banded"),
        attention_window=256,
    )


def _gpt_neo(n_layer: int, n_head: int, n_embd: int) -> dict[str, Any]:
    # GPT-Neo: GPT-3's alternating global/local layers (window 256), but no 1/sqrt(d)
    # scaling and no q/k/v biases.
    return {**_gpt3(n_layer, n_embd, n_head), "attention_scale": 1.0, "qkv_bias": False}


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": _gpt2(12, 12, 768),
    "gpt2-medium": _gpt2(24, 16, 1024),
    "gpt2-large": _gpt2(36, 20, 1280),
    "gpt2-xl": _gpt2(48, 25, 1600),
    # GPT-3 paper, Table 2.1 (n_layers, d_model, n_heads). Two rows are inconsistent as
    # printed and we follow d_head: XL lists 24 heads of d_head=128 for d_model=2048, so
    # we use 16 heads (2048/128); 13B lists d_model=5140, but 40 heads x 128 = 5120.
    "gpt3-small": _gpt3(12, 768, 12),
    "gpt3-medium": _gpt3(24, 1024, 16),
    "gpt3-large": _gpt3(24, 1536, 16),
    "gpt3-xl": _gpt3(24, 2048, 16),
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    "gpt3-13b": _gpt3(40, 5120, 40),
    "gpt3-175b": _gpt3(96, 12288, 96),
    "gpt-neo-125m": _gpt_neo(12, 12, 768),
    "gpt-neo-1.3b": _gpt_neo(24, 16, 2048),
    "gpt-neo-2.7b": _gpt_neo(32, 20, 2560),
    # The main job's model: character-level Shakespeare on a 2-core CPU in well under a
    # minute. Small and shallow because at that budget more tokens beat more parameters:
    # 2 x 96 trained on 4.3M characters ends lower than 4 x 128 on 1M in the same time
    # (benchmarks/NOTES.md). Exact GELU: it is trained from scratch, and on CPUs the tanh
    # form costs twice as much.
    "tiny": dict(
        vocab_size=65,
        block_size=64,
        n_layer=2,
        n_head=3,
        n_embd=96,
        attention_pattern=("dense", "banded"),
        attention_window=32,
        activation="gelu",
    ),
}

# The GPT-3 paper's Table 2.1, as published: for tests and `minigpt inspect`.
GPT3_TABLE: dict[str, dict[str, Any]] = {
    "gpt3-small": dict(n_params=125e6, n_layers=12, d_model=768, n_heads=12, d_head=64, batch_tokens=0.5e6, lr=6.0e-4),
    "gpt3-medium": dict(n_params=350e6, n_layers=24, d_model=1024, n_heads=16, d_head=64, batch_tokens=0.5e6, lr=3.0e-4),
    "gpt3-large": dict(n_params=760e6, n_layers=24, d_model=1536, n_heads=16, d_head=96, batch_tokens=0.5e6, lr=2.5e-4),
    "gpt3-xl": dict(n_params=1.3e9, n_layers=24, d_model=2048, n_heads=24, d_head=128, batch_tokens=1e6, lr=2.0e-4),
    "gpt3-2.7b": dict(n_params=2.7e9, n_layers=32, d_model=2560, n_heads=32, d_head=80, batch_tokens=1e6, lr=1.6e-4),
    "gpt3-6.7b": dict(n_params=6.7e9, n_layers=32, d_model=4096, n_heads=32, d_head=128, batch_tokens=2e6, lr=1.2e-4),
    "gpt3-13b": dict(n_params=13.0e9, n_layers=40, d_model=5140, n_heads=40, d_head=128, batch_tokens=2e6, lr=1.0e-4),
    "gpt3-175b": dict(n_params=175.0e9, n_layers=96, d_model=12288, n_heads=96, d_head=128, batch_tokens=3.2e6, lr=0.6e-4),
}

# Published parameter counts of the GPT-2 family (Radford et al. 2019, as corrected by the
# released checkpoints) and GPT-Neo.
PUBLISHED_PARAMS: dict[str, float] = {
    "gpt2": 124e6,
    "gpt2-medium": 355e6,
    "gpt2-large": 774e6,
    "gpt2-xl": 1.558e9,
    "gpt-neo-125m": 125e6,
    "gpt-neo-1.3b": 1.3e9,
    "gpt-neo-2.7b": 2.7e9,
    **{name: row["n_params"] for name, row in GPT3_TABLE.items()},
}
