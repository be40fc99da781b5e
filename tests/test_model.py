import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig
from minigpt.ops import band_mask
from tests.helpers import randomize_

# float32 logits from two backends computing the same math in different orders.
FP32_ATOL = 1e-5


def tiny(**changes) -> GPTConfig:
    base = dict(vocab_size=61, block_size=48, n_layer=4, n_head=2, n_embd=16,
                attention_pattern=("dense", "banded"), attention_window=5)
    return GPTConfig(**{**base, **changes})


def model_for(config: GPTConfig, backend="math", seed=0) -> GPT:
    torch.manual_seed(seed)
    return randomize_(GPT(config, backend=backend), seed).eval()


def test_forward_shapes_and_loss_ignores_minus_100():
    model = model_for(tiny())
    idx = torch.randint(0, 61, (3, 11))
    targets = idx.clone()
    out = model(idx, targets)
    assert out.logits.shape == (3, 11, 61)
    targets[:, :5] = -100
    expected = torch.nn.functional.cross_entropy(out.logits[:, 5:].reshape(-1, 61), idx[:, 5:].reshape(-1))
    torch.testing.assert_close(model(idx, targets).loss, expected)


def test_weights_are_tied_and_residual_projections_scaled():
    model = GPT(GPTConfig(n_layer=8, n_embd=64, n_head=4, vocab_size=100, block_size=16))
    assert model.lm_head.weight is model.tok_emb.weight
    std = model.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02 / 4) < 0.002  # 0.02 / sqrt(2 * 8)


def test_band_mask_semantics():
    i = torch.arange(6)
    mask = band_mask(i, i, window=2)
    for q in range(6):
        for k in range(6):
            assert bool(mask[q, k]) == (q - 2 < k <= q)


@given(t=st.integers(2, 20), change=st.data(), backend=st.sampled_from(["math", "sdpa"]))
def test_changing_a_future_token_never_changes_earlier_logits(t, change, backend):
    model = model_for(tiny(), backend)
    idx = torch.randint(0, 61, (1, t))
    pos = change.draw(st.integers(1, t - 1))
    other = idx.clone()
    other[0, pos] = (other[0, pos] + 1) % 61
    a, b = model(idx).logits, model(other).logits
    torch.testing.assert_close(a[:, :pos], b[:, :pos], rtol=0, atol=FP32_ATOL)
    assert not torch.allclose(a[:, pos], b[:, pos])


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_banded_layer_ignores_tokens_beyond_its_window(backend):
    # One banded layer of width 4: token 0's influence on position 9 must vanish.
    config = tiny(n_layer=1, attention_pattern=("banded",), attention_window=4)
    model = model_for(config, backend)
    idx = torch.randint(0, 61, (1, 12))
    other = idx.clone()
    other[0, 0] = (other[0, 0] + 7) % 61
    a, b = model(idx).logits, model(other).logits
    torch.testing.assert_close(a[:, 4:], b[:, 4:], rtol=0, atol=FP32_ATOL)  # 0 is outside 4..'s band
    assert not torch.allclose(a[:, 3], b[:, 3])  # inside the band of position 3


@given(t=st.integers(1, 48), window=st.integers(1, 60), batch=st.integers(1, 3))
def test_backends_agree_forward(t, window, batch):
    config = tiny(attention_window=window)
    math_model = model_for(config, "math")
    sdpa_model = model_for(config, "sdpa")
    idx = torch.randint(0, 61, (batch, t))
    torch.testing.assert_close(sdpa_model(idx).logits, math_model(idx).logits, rtol=1e-5, atol=FP32_ATOL)


def test_backends_agree_on_gradients():
    config = tiny()
    idx = torch.randint(0, 61, (2, 30))
    grads = {}
    for backend in ("math", "sdpa"):
        model = model_for(config, backend)
        model(idx, idx).loss.backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads["math"].items():
        torch.testing.assert_close(grads["sdpa"][name], g, rtol=1e-4, atol=1e-5, msg=name)


@given(t=st.integers(1, 30), chunks=st.lists(st.integers(1, 9), min_size=1, max_size=5), window=st.integers(1, 8))
def test_kv_cache_in_chunks_equals_full_forward(t, chunks, window):
    """Feeding a sequence through the cache in arbitrary chunks gives the full forward's logits."""
    model = model_for(tiny(attention_window=window), "sdpa")
    idx = torch.randint(0, 61, (2, t))
    full = model(idx).logits
    cache = model.new_cache(2)
    pieces, start, i = [], 0, 0
    while start < t:
        step = chunks[i % len(chunks)]
        pieces.append(model(idx[:, start:start + step], cache=cache).logits)
        start += step
        i += 1
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=FP32_ATOL)


def test_left_padded_row_matches_the_row_alone():
    model = model_for(tiny(), "sdpa")
    short = torch.randint(0, 61, (1, 7))
    alone = model(short).logits
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)
    out = model(padded, left_pad=torch.tensor([4])).logits
    torch.testing.assert_close(out[:, 4:], alone, rtol=1e-5, atol=FP32_ATOL)


def test_hidden_states_and_attentions_are_what_forward_used():
    model = model_for(tiny(), "sdpa")
    idx = torch.randint(0, 61, (2, 9))
    out = model(idx, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == model.config.n_layer + 1
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)
    for layer, probs in enumerate(out.attentions):
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 9))
        i = torch.arange(9)
        allowed = band_mask(i, i, model.config.layer_window(layer))
        assert torch.all(probs[..., ~allowed] == 0)


@pytest.mark.parametrize(
    "idx, message",
    [
        (torch.tensor([[1, 2, 61]]), "token id 61 is out of range for vocab_size=61"),
        (torch.tensor([[1, -1]]), "token id -1 is out of range"),
        (torch.zeros(1, 49, dtype=torch.long), "exceeds block_size=48"),
        (torch.tensor([[1.0, 2.0]]), "integer token ids"),
        (torch.tensor([1, 2]), r"\(batch, seq\)"),
        (torch.zeros(1, 0, dtype=torch.long), "no tokens"),
    ],
)
def test_bad_inputs_raise_clear_errors(idx, message):
    with pytest.raises(ValueError, match=message):
        model_for(tiny())(idx)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend='flash'.*math"):
        GPT(tiny(), backend="flash")
