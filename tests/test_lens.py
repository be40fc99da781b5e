import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minigpt import GPT, CharTokenizer, GPTConfig
from minigpt.cli import main
from minigpt.lens import lens_labels, lens_logits, logit_lens
from minigpt.tokenizer import save_tokenizer
from tests.helpers import randomize_

ALPHABET = "abcdefghij ."


def small_model(seed=0, **changes) -> GPT:
    base = dict(vocab_size=len(ALPHABET), block_size=24, n_layer=4, n_head=2, n_embd=16,
                attention_pattern=("dense", "banded"), attention_window=3)
    torch.manual_seed(seed)
    return randomize_(GPT(GPTConfig(**{**base, **changes})), seed).eval()


@given(
    pattern=st.sampled_from([("dense",), ("banded",), ("dense", "banded")]),
    window=st.integers(1, 6),
    scale=st.sampled_from([None, 1.0]),
    T=st.integers(1, 10),
    seed=st.integers(0, 3),
)
def test_lens_at_the_last_layer_is_the_models_own_prediction(pattern, window, scale, T, seed):
    model = small_model(seed, attention_pattern=pattern, attention_window=window, attention_scale=scale)
    idx = torch.randint(0, len(ALPHABET), (2, T))
    lens = lens_logits(model, idx)
    assert lens.shape == (model.config.n_layer + 1, 2, T, len(ALPHABET))
    torch.testing.assert_close(lens[-1], model(idx).logits)
    torch.testing.assert_close(lens_logits(model, idx, position=-1), lens[:, :, -1])


def test_lens_reads_the_residual_stream_the_blocks_actually_produce():
    # Chain the blocks by hand (an independent forward): reading i is the stream after
    # block i-1, through ln_f and the head.
    model = small_model()
    idx = torch.randint(0, len(ALPHABET), (1, 9))
    lens = lens_logits(model, idx)
    with torch.no_grad():
        x = model.tok_emb(idx) + model.pos_emb(torch.arange(9))
        expected = [model.lm_head(model.ln_f(x))]
        for block in model.blocks:
            x = block(x)
            expected.append(model.lm_head(model.ln_f(x)))
    torch.testing.assert_close(lens, torch.stack(expected))


def test_logit_lens_table_tops_are_sorted_and_end_with_the_models_choice():
    model = small_model()
    tokenizer = CharTokenizer(ALPHABET)
    table = logit_lens(model, tokenizer, "abc.ja", top_k=3, position=-2)
    assert table.position == 4 and table.prompt_tokens == list("abc.ja")
    assert table.layers == lens_labels(4) and len(table.top_tokens) == 5
    for probs in table.top_probs:
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    logits = model(torch.tensor([tokenizer.encode("abc.ja")])).logits[0, 4]
    assert table.top_tokens[-1] == [tokenizer.decode([i]) for i in logits.topk(3).indices.tolist()]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "no tokens"),
    (dict(position=6), "position=6 is outside the prompt of 6 tokens"),
    (dict(position=-7), "position=-7"),
    (dict(top_k=0), "top_k=0"),
])
def test_logit_lens_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        logit_lens(small_model(), CharTokenizer(ALPHABET), **{"prompt": "abc.ja", **kwargs})


def test_cli_logit_lens_prints_one_row_per_layer_and_json(tmp_path, capsys):
    model = small_model()
    model.save_pretrained(tmp_path)
    save_tokenizer(CharTokenizer(ALPHABET), tmp_path)
    main(["logit-lens", "--model", str(tmp_path), "--prompt", "abc", "--top-k", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "logit lens: next token after 'abc' (position 2), top 2 per layer"
    assert [line.split("  ")[0] for line in lines[3:]] == lens_labels(4)
    main(["logit-lens", "--model", str(tmp_path), "--prompt", "abc", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert len(data["top_tokens"]) == 5 and len(data["top_tokens"][0]) == 5
