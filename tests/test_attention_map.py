import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.image import imread

from minigpt import GPT, CharTokenizer, GPTConfig
from minigpt.attention_map import (
    MAX_PANELS,
    attention_maps,
    mask_patterns,
    plot_attention,
    plot_mask_pattern,
    token_label,
)
from minigpt.cli import main
from minigpt.ops import band_mask
from minigpt.tokenizer import save_tokenizer
from tests.helpers import randomize_

ALPHABET = "abcdefghij ."


def small_model(seed=0, **changes) -> GPT:
    base = dict(vocab_size=len(ALPHABET), block_size=32, n_layer=4, n_head=3, n_embd=12,
                attention_pattern=("dense", "banded"), attention_window=3)
    torch.manual_seed(seed)
    return randomize_(GPT(GPTConfig(**{**base, **changes})), seed).eval()


def assert_png(path, min_side=100):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    height, width = imread(path).shape[:2]
    assert height >= min_side and width >= min_side


@given(pattern=st.sampled_from([("dense",), ("banded",), ("dense", "banded")]), window=st.integers(1, 8),
       T=st.integers(1, 12), seed=st.integers(0, 3))
def test_map_data_are_the_models_probabilities_each_row_summing_to_1_inside_the_band(pattern, window, T, seed):
    model = small_model(seed, attention_pattern=pattern, attention_window=window)
    idx = torch.randint(0, len(ALPHABET), (T,))
    maps = attention_maps(model, idx, ["t"] * T, layers=[3, 0], heads=[2, 0])
    attentions = model(idx[None], output_attentions=True).attentions
    for r, layer in enumerate([3, 0]):
        torch.testing.assert_close(maps.probs[r], attentions[layer][0, [2, 0]])
        allowed = band_mask(torch.arange(T), torch.arange(T), model.config.layer_window(layer))
        assert torch.equal(maps.masks[r], allowed)
        assert maps.kinds[r] == ("dense" if model.config.layer_window(layer) is None else f"banded w={window}")
    torch.testing.assert_close(maps.probs.sum(-1), torch.ones(2, 2, T))
    assert torch.all(maps.probs[..., ~maps.masks[:, None].expand_as(maps.probs)] == 0)
    assert torch.all(maps.probs[maps.masks[:, None].expand_as(maps.probs)] > 0)


def test_mask_patterns_give_one_mask_per_layer_kind():
    config = GPTConfig.from_preset("gpt3-small")
    patterns = mask_patterns(config, seq_len=300)
    assert list(patterns) == ["dense", "banded w=256"]
    i = torch.arange(300)
    assert torch.equal(patterns["dense"], band_mask(i, i, None))
    assert torch.equal(patterns["banded w=256"], band_mask(i, i, 256))
    assert patterns["banded w=256"][299].sum() == 256 and patterns["dense"][299].sum() == 300
    assert list(mask_patterns(GPTConfig.from_preset("gpt2"), 8)) == ["dense"]
    with pytest.raises(ValueError, match="seq_len=3000 must be an integer in \\[1, block_size=2048\\]"):
        mask_patterns(config, 3000)


def test_plot_attention_writes_a_readable_png(tmp_path):
    model = small_model()
    text = "abc def. ghij abc"
    idx = CharTokenizer(ALPHABET).encode(text)
    maps = attention_maps(model, idx, [token_label(c) for c in text], layers=[0, 1], heads=[0, 2])
    assert_png(plot_attention(maps, tmp_path / "sub" / "map.png", title="test"), min_side=400)


def test_long_prompts_and_big_grids(tmp_path):
    model = small_model(block_size=200, n_layer=2, n_head=1)
    idx = torch.randint(0, len(ALPHABET), (150,))
    maps = attention_maps(model, idx, ["x"] * 150)
    assert_png(plot_attention(maps, tmp_path / "long.png"))
    too_many = small_model(n_layer=MAX_PANELS // 3 + 1, n_head=3, attention_pattern=("dense",))
    maps = attention_maps(too_many, [1, 2], ["a", "b"])
    with pytest.raises(ValueError, match="panels is more than 64; choose fewer"):
        plot_attention(maps, tmp_path / "x.png")


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=[4]), r"layers \[4\] out of range: this model has layers 0..3"),
    (dict(heads=[-1]), r"heads \[-1\] out of range"),
    (dict(layers=[]), "layers is empty"),
    (dict(tokens=["a"]), "1 token labels for 2 token ids"),
])
def test_attention_maps_reject_bad_indices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attention_maps(small_model(), [1, 2], **{"tokens": ["a", "b"], **kwargs})


def test_mask_pattern_figure_for_gpt3(tmp_path):
    assert_png(plot_mask_pattern(GPTConfig.from_preset("gpt3-small"), tmp_path / "p.png", 512, "gpt3-small"), 400)


def test_token_labels_show_spaces_and_newlines():
    assert token_label(" the") == "␣the"
    assert token_label("\n") == "↵"
    assert token_label("x" * 20) == "x" * 11 + "…"


def test_cli_attention_map_and_pattern(tmp_path, capsys):
    small_model().save_pretrained(tmp_path / "model")
    save_tokenizer(CharTokenizer(ALPHABET), tmp_path / "model")
    main(["attention-map", "--model", str(tmp_path / "model"), "--prompt", "abc. def",
          "--layers", "0,1", "--heads", "1", "--out", str(tmp_path / "map.png")])
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'map.png'}"
    assert_png(tmp_path / "map.png")
    main(["attention-map", "--pattern", "tiny", "--out", str(tmp_path / "pattern.png")])
    assert_png(tmp_path / "pattern.png")
    with pytest.raises(SystemExit, match="--model needs --prompt"):
        main(["attention-map", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "x.png")])
