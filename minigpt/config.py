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

from minigpt.presets import PRESETS
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
