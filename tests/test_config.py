import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig, params
from minigpt.presets import GPT3_TABLE, PRESETS, PUBLISHED_PARAMS
from minigpt.counts import flops_per_token


def test_every_preset_builds_and_validates():
    for name in PRESETS:
        config = GPTConfig.from_preset(name)
        assert config.n_embd % config.n_head == 0
        assert len(config.layer_kinds) == config.n_layer


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_param_count_matches_published_figure(name):
    # Published figures are rounded (e.g. "2.7B"); 3% covers the rounding, not a wrong shape.
    counted = GPTConfig.from_preset(name).num_params()
    assert abs(counted - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.03


@pytest.mark.parametrize("name", sorted(GPT3_TABLE))
def test_gpt3_presets_follow_table_2_1(name):
    row, config = GPT3_TABLE[name], GPTConfig.from_preset(name)
    assert config.n_layer == row["n_layers"]
    assert config.head_dim == row["d_head"]
    assert config.block_size == 2048
    assert config.layer_kinds[:2] == ("dense", "banded")
    if name not in ("gpt3-13b",):  # the table prints 5140 for 13B (40 x 128 = 5120)
        assert config.n_embd == row["d_model"]


def test_gpt3_175b_counts_without_allocating():
    # Computed from the config alone: instant, no memory.
    assert 174e9 < GPTConfig.from_preset("gpt3-175b").num_params() < 176e9


@given(
    n_layer=st.integers(1, 4),
    n_head=st.integers(1, 4),
    head_dim=st.integers(1, 8),
    vocab=st.integers(2, 60),
    block=st.integers(1, 40),
    bias=st.booleans(),
    qkv_bias=st.booleans(),
    tie=st.booleans(),
    inner=st.one_of(st.none(), st.integers(1, 20)),
)
def test_param_count_equals_instantiated_model(n_layer, n_head, head_dim, vocab, block, bias, qkv_bias, tie, inner):
    config = GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_head * head_dim,
                       bias=bias, qkv_bias=qkv_bias, tie_embeddings=tie, n_inner=inner)
    assert params(config) == GPT(config).num_params()


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(n_embd=100, n_head=12), ["n_embd=100", "n_head=12", "try n_embd=96"]),
        (dict(n_layer=0), ["n_layer=0", "positive"]),
        (dict(dropout=1.5), ["dropout=1.5"]),
        (dict(attention_pattern=("dense", "sparse")), ["'sparse'", "dense", "banded"]),
        (dict(n_layer=3, attention_pattern=("dense", "banded")), ["n_layer=3", "len(attention_pattern)=2"]),
        (dict(attention_window=0), ["attention_window=0"]),
        (dict(attention_scale=-1.0), ["attention_scale=-1.0"]),
        (dict(attention_pattern="dense"), ["tuple"]),
        (dict(activation="relu"), ["activation='relu'", "gelu_tanh", "'gelu'"]),
    ],
)
def test_invalid_config_names_field_value_and_rule(changes, words):
    with pytest.raises(ValueError) as info:
        GPTConfig(**changes)
    for word in words:
        assert word in str(info.value)


def test_unknown_keys_are_rejected_with_the_valid_list():
    with pytest.raises(ValueError, match="n_layers.*valid keys.*n_layer"):
        GPTConfig.from_dict({"n_layers": 2})
    with pytest.raises(ValueError, match="unknown preset 'gpt5'.*gpt2"):
        GPTConfig.from_preset("gpt5")


def test_config_is_frozen_and_round_trips_through_dict():
    config = GPTConfig.from_preset("gpt-neo-125m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_layer = 3
    assert GPTConfig.from_dict(config.to_dict()) == config


def test_flops_count_banded_layers_by_their_window():
    dense = GPTConfig.from_preset("gpt3-small", attention_pattern=("dense",))
    banded = GPTConfig.from_preset("gpt3-small")
    T = 2048
    per_layer = 3 * 4 * dense.n_embd
    assert flops_per_token(dense, T) - flops_per_token(banded, T) == pytest.approx(6 * per_layer * (T - 256))
    # Training is 6N + attention, N the non-embedding parameters plus the LM head.
    n = params(dense, non_embedding=True) + dense.vocab_size * dense.n_embd
    assert flops_per_token(dense, T) == pytest.approx(6 * n + 12 * dense.n_layer * dense.n_embd * T)
