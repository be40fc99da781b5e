import pytest

from minigpt import CharTokenizer, Tokenizer
from tests.helpers import DATA, need_file, use_tiktoken_cache


def test_gpt2_encoding_from_the_offline_cache(monkeypatch):
    use_tiktoken_cache(monkeypatch)
    tok = Tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"
    assert tok.eos_id == 50256 and tok.vocab_size == 50257
    assert tok.encode("<|endoftext|>", allow_eos=True) == [50256]
    assert 50256 not in tok.encode("<|endoftext|>")


def test_gpt2_files_give_the_same_ids_as_tiktoken(monkeypatch):
    use_tiktoken_cache(monkeypatch)
    local = Tokenizer.from_gpt2_files(need_file(DATA / "gpt2_bpe"))
    text = "It's 2026: naïve café — tokens, numbers 12345 and  spaces\n\n"
    assert local.encode(text) == Tokenizer().encode(text)
    assert local.eos_id == 50256


def test_offline_without_cache_names_the_files_to_place(monkeypatch, tmp_path):
    import tiktoken.load

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MINIGPT_GPT2_BPE_DIR", raising=False)

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    import tiktoken.registry

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer()
    message = str(info.value)
    assert "6d1cbeee0f20b3d9449abfede4726ed8212e3aee" in message and "TIKTOKEN_CACHE_DIR" in message
    assert "MINIGPT_GPT2_BPE_DIR" in message


def test_char_tokenizer_round_trips_and_rejects_unknown_characters():
    tok = CharTokenizer.from_text("hello world")
    assert tok.decode(tok.encode("hello")) == "hello"
    assert tok.vocab_size == 8
    with pytest.raises(ValueError, match="'z' is not in"):
        tok.encode("z")


def test_missing_tokenizer_files_message_without_chained_traceback(monkeypatch, tmp_path):
    import tiktoken.load
    import tiktoken.registry

    from minigpt.tokenizer import TokenizerFilesMissing

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("MINIGPT_GPT2_BPE_DIR", raising=False)

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    with pytest.raises(TokenizerFilesMissing) as info:
        Tokenizer()
    assert info.value.__cause__ is None and info.value.__suppress_context__  # raised `from None`
    message = str(info.value)
    assert f"tiktoken looked for its cached files in {tmp_path / 'empty-cache'}" in message
    assert "set TIKTOKEN_CACHE_DIR to a folder" in message and "--tokenizer=char" in message


@pytest.mark.parametrize("text, message", [
    ('{"type": ', r"is not valid JSON: .* line 1"),
    ('{"type": "char"}', r'a char tokenizer needs its alphabet: a non-empty string under "chars"'),
    ('{"type": "sentencepiece"}', r"unknown tokenizer type 'sentencepiece'"),
    ("[]", r"must hold an object"),
])
def test_bad_tokenizer_json_names_file(tmp_path, text, message):
    from minigpt.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(ValueError, match=rf"tokenizer file .*tokenizer\.json.*{message}"):
        load_tokenizer(tmp_path)
