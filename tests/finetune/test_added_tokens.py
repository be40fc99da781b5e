"""Added special tokens (`minigpt.finetune.run.add_tokens`) and resized embeddings
(`GPT.resize_token_embeddings`): old behaviour kept bit for bit, new rows at the mean, and
the saved folder read the same by minigpt and by `transformers`."""

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.cli import main
from minigpt.finetune.run import add_tokens
from minigpt.tokenizer import Tokenizer, load_tokenizer, save_tokenizer
from tests.helpers import DATA, need_file, randomize_, use_tiktoken_cache

NEW = ["<|startoftext|>", "<|pad|>"]


@pytest.fixture
def tokenizer(monkeypatch):
    use_tiktoken_cache(monkeypatch)
    return Tokenizer()


def small_gpt(vocab_size=50257, seed=3):
    config = GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16)
    return randomize_(GPT(config), seed=seed, std=0.2).eval()


def test_added_tokens_take_the_ids_after_the_vocabulary_and_are_recognized(tokenizer):
    assert tokenizer.add_special_tokens(NEW) == NEW
    assert tokenizer.add_special_tokens(NEW[:1]) == []  # already there: nothing changes
    assert tokenizer.vocab_size == 50259 and tokenizer.token_id("<|pad|>") == 50258
    ids = tokenizer.encode("<|startoftext|>Hello world<|pad|>")
    assert ids == [50257, 15496, 995, 50258]
    assert tokenizer.decode(ids) == "<|startoftext|>Hello world<|pad|>"
    assert tokenizer.encode("<|pad|>", allow_added=False) != [50258]
    assert 50256 not in tokenizer.encode("<|endoftext|>")  # eos stays plain text unless allowed
    with pytest.raises(ValueError, match="listed twice"):
        tokenizer.add_special_tokens(["<|a|>", "<|a|>"])
    with pytest.raises(ValueError, match="not a special token.*add_special_tokens"):
        tokenizer.set_pad_token("<|sep|>")


def test_logits_without_new_tokens_are_bit_identical_after_adding_two(tokenizer):
    model = small_gpt()
    idx = torch.tensor([tokenizer.encode("The cat sat on the mat, and then it slept.")])
    before = model(idx).logits
    old_rows = model.tok_emb.weight.detach().clone()
    add_tokens(model, tokenizer, NEW)
    after = model(idx).logits
    assert after.shape[-1] == 50259 and model.config.vocab_size == 50259
    assert torch.equal(after[..., :50257], before)
    assert torch.equal(model.tok_emb.weight[:50257], old_rows)
    assert model.lm_head.weight is model.tok_emb.weight  # still tied
    mean = old_rows.mean(0)
    for row in model.tok_emb.weight[50257:]:
        torch.testing.assert_close(row, mean, rtol=0, atol=1e-7)


def test_padded_vocabulary_reuses_padding_rows(tokenizer):
    model = small_gpt(vocab_size=50304)
    real_mean = model.tok_emb.weight[:50257].detach().float().mean(0)
    add_tokens(model, tokenizer, NEW)
    assert model.config.vocab_size == 50304
    torch.testing.assert_close(model.tok_emb.weight[50258].detach(), real_mean, rtol=0, atol=1e-7)


def test_shrinking_is_refused_with_the_sizes(tokenizer):
    with pytest.raises(ValueError, match="new_vocab_size=100 is below the model's vocab_size=50257"):
        small_gpt().resize_token_embeddings(100)


def test_untied_head_grows_too():
    config = GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=8, tie_embeddings=False)
    model = randomize_(GPT(config))
    head = model.lm_head.weight.detach().clone()
    model.resize_token_embeddings(99)
    assert model.lm_head.weight.shape == (99, 8) and torch.equal(model.lm_head.weight[:97], head)
    torch.testing.assert_close(model.lm_head.weight[98].detach(), head.mean(0), rtol=0, atol=1e-7)


def saved_folder(tmp_path, tokenizer):
    model = small_gpt()
    add_tokens(model, tokenizer, NEW)
    tokenizer.set_pad_token("<|pad|>")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder, model.config.block_size)
    return model, folder


def test_transformers_reads_the_exported_tokens_and_scores_the_same(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    model, folder = saved_folder(tmp_path, tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    text = "<|startoftext|>Review: a gem of a film<|pad|> positive<|pad|><|pad|>"
    ids = tokenizer.encode(text)
    assert hf_tok(text).input_ids == ids
    assert ids[0] == 50257 and ids.count(50258) == 3
    assert len(hf_tok) == 50259 and hf_tok.pad_token_id == 50258
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits
        got = hf_model(torch.tensor([ids])).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_save_load_save_is_byte_stable(tmp_path, tokenizer):
    _, first = saved_folder(tmp_path, tokenizer)
    model = GPT.from_pretrained(first)
    second = tmp_path / "again"
    model.save_pretrained(second)
    save_tokenizer(load_tokenizer(first), second, model.config.block_size)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert "added_tokens.json" in names and "tokenizer.json" not in names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_written_merges_are_gpt2s_original_vocab_bpe(tmp_path, tokenizer):
    original = need_file(DATA / "gpt2_bpe" / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    save_tokenizer(tokenizer, tmp_path)
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] == original[1:]


def test_added_tokens_round_trip_through_sample(tmp_path, tokenizer, capsys, caplog):
    model, folder = saved_folder(tmp_path, tokenizer)
    prompt = "<|startoftext|>Once upon"
    loaded = load_tokenizer(folder)
    assert loaded.added_tokens == tuple(NEW) and loaded.encode(prompt)[0] == 50257
    main(["sample", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"])
    from minigpt import generate_text

    expected = prompt + generate_text(model, tokenizer, prompt, 8, temperature=0)[0] + "\n"
    assert capsys.readouterr().out == expected


def test_a_folder_with_gapped_added_ids_is_a_clear_error(tmp_path, tokenizer):
    _, folder = saved_folder(tmp_path, tokenizer)
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"50258"', '"50260"'))
    with pytest.raises(ValueError, match=r"added token ids \[50257, 50260\] must follow"):
        load_tokenizer(folder)
