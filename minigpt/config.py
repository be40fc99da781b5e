"""Model configuration: one frozen, validated dataclass and the named presets.

Every architectural difference between GPT-2, GPT-3 and GPT-Neo is an explicit
field (attention pattern, band width, softmax scale, q/k/v bias); code never
branches on a model's name.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt.typed import check_fields

LAYER_KINDS = ("dense", "banded")


def reject_unknown_keys(cls: type, values: dict[str, Any]) -> None:
    """ValueError naming the keys of `values` that dataclass `cls` has no field for, and
    listing the valid ones: every config in minigpt is built from user dicts this way."""
    if not isinstance(values, dict):
        raise ValueError(f"{cls.__name__} settings must be a table of key = value pairs; got {values!r}")
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys are: {', '.join(sorted(valid))}")


# MLP non-linearities. GPT-2, GPT-3 and GPT-Neo use GELU's tanh approximation; the exact
# (erf) GELU is a choice for models trained from scratch, and on CPUs without AVX-512 it
# is about twice as fast as the tanh form (benchmarks/NOTES.md).
ACTIVATIONS = ("gelu_tanh", "gelu")


@dataclass(frozen=True)
class GPTConfig:
    """Shape and architecture of a decoder-only transformer."""

    vocab_size: int = 50257
    """Number of token ids the embedding and head cover."""
    block_size: int = 1024
    """Context length: the number of learned positions."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per layer."""
    n_embd: int = 768
    """Width of the residual stream (d_model)."""
    n_inner: int | None = None
    """Hidden width of the MLP; None means 4 * n_embd."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches."""
    bias: bool = True
    """Biases in the output/MLP projections and LayerNorms."""
    qkv_bias: bool = True
    """Biases in the query/key/value projections (GPT-Neo has none)."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""
    attention_pattern: tuple[str, ...] = ("dense",)
    """Layer kinds ('dense' or 'banded'), repeated cyclically over the layers."""
    attention_window: int = 256
    """Band width w of 'banded' layers: query i sees keys i-w+1 .. i."""
    attention_scale: float | None = None
    """Softmax scale; None means 1/sqrt(head_dim). GPT-Neo uses 1.0."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the LM head."""
    activation: str = "gelu_tanh"
    """MLP non-linearity: 'gelu_tanh' (GPT-2's approximation) or 'gelu' (exact, erf)."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "attention_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head != 0:
            suggestion = max(self.n_head, round(self.n_embd / self.n_head) * self.n_head)
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"try n_embd={suggestion}"
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise ValueError(f"n_inner={self.n_inner!r} must be a positive integer or None (4 * n_embd)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps} must be > 0")
        if isinstance(self.attention_pattern, str) or not isinstance(self.attention_pattern, tuple):
            raise ValueError(
                f"attention_pattern={self.attention_pattern!r} must be a tuple of layer kinds, "
                f"e.g. ('dense', 'banded')"
            )
        if not self.attention_pattern:
            raise ValueError("attention_pattern=() must name at least one layer kind")
        for kind in self.attention_pattern:
            if kind not in LAYER_KINDS:
                raise ValueError(
                    f"attention_pattern contains {kind!r}; each entry must be one of {LAYER_KINDS}"
                )
        if self.n_layer % len(self.attention_pattern) != 0:
            raise ValueError(
                f"n_layer={self.n_layer} is not a multiple of len(attention_pattern)="
                f"{len(self.attention_pattern)}; the pattern repeats over the layers"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} must be one of {ACTIVATIONS}")
        if self.attention_scale is not None and not self.attention_scale > 0:
            raise ValueError(f"attention_scale={self.attention_scale} must be > 0 or None (1/sqrt(head_dim))")

    # Derived values ---------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def softmax_scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """The kind of every layer, `attention_pattern` repeated to n_layer entries."""
        reps = self.n_layer // len(self.attention_pattern)
        return self.attention_pattern * reps

    def layer_window(self, layer: int) -> int | None:
        """Band width of `layer`, or None for a dense layer."""
        return self.attention_window if self.layer_kinds[layer] == "banded" else None

    def num_params(self, non_embedding: bool = False) -> int:
        """Trainable parameters, computed from the config alone (nothing is allocated)."""
        from minigpt.counts import params

        return params(self, non_embedding=non_embedding)

    # Construction and serialisation ----------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A named preset (see `PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GPTConfig":
        """Build from a plain dict; unknown keys are an error that lists the valid ones."""
        reject_unknown_keys(cls, values)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["attention_pattern"] = list(self.attention_pattern)
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> "GPTConfig":
        """Build from a JSON file of GPTConfig fields; errors name the file."""
        from minigpt.files import read_json

        values = read_json(path, "model config")
        try:
            return cls.from_dict(values)
        except ValueError as err:
            raise ValueError(f"model config {path}: {err}") from None

    def replace(self, **changes: Any) -> "GPTConfig":
        """A copy with some fields changed (validated again)."""
        return self.from_dict({**self.to_dict(), **changes})


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
    # The main job's model: character-level Shakespeare on a 2-core CPU in under two
    # minutes (benchmarks/NOTES.md). Exact GELU: it is trained from scratch, and on CPUs
    # the tanh form costs twice as much.
    "tiny": dict(
        vocab_size=65,
        block_size=64,
        n_layer=4,
        n_head=4,
        n_embd=128,
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
