"""`minigpt prepare`: token shards, metadata, the split, streaming, and clear errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minigpt.pretrain import PrepareConfig, TokenSplit, prepare, read_metadata
from minigpt.tokenizer import tokenizer_from_dict
from tests.helpers import SHAKESPEARE, need_file, use_tiktoken_cache


def _prepare(tmp_path, inputs, **kwargs):
    out = tmp_path / "out"
    meta = prepare(PrepareConfig(inputs=tuple(str(i) for i in inputs), out_dir=str(out), progress=False, **kwargs))
    return out, meta


def _tokens(folder, split):
    data = TokenSplit(folder, split)
    return np.concatenate([np.asarray(a) for a in data.arrays]).tolist()


def test_char_shakespeare_split_and_alphabet_match_nanogpt(tmp_path):
    out, meta = _prepare(tmp_path, [need_file(SHAKESPEARE)], tokenizer="char")
    assert meta["vocab_size"] == 65 and meta["dtype"] == "uint16"
    assert meta["splits"]["train"]["tokens"] == 1_003_854  # nanoGPT: int(0.9 * 1,115,394)
    assert meta["splits"]["val"]["tokens"] == 111_540
    assert meta["tokenizer"]["chars"] == "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    tokenizer = tokenizer_from_dict(read_metadata(out)["tokenizer"])
    text = SHAKESPEARE.read_text()
    assert tokenizer.decode(_tokens(out, "val")[:200]) == text[1_003_854:1_004_054]
    assert all(len(s["sha256"]) == 64 for s in meta["splits"]["train"]["shards"])


def test_gpt2_shakespeare_counts_match_nanogpt_with_small_stream_blocks(tmp_path, monkeypatch):
    use_tiktoken_cache(monkeypatch)
    # 20 kB blocks cut the text ~50 times; the cuts must not change GPT-2's tokens.
    _, meta = _prepare(tmp_path, [need_file(SHAKESPEARE)], eos=False, chunk_bytes=20_000)
    assert (meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"]) == (301_966, 36_059)


text_strategy = st.text(alphabet=st.sampled_from(list("ab \n\t\u00e9\u20ac\U0001F600.")), min_size=1, max_size=300)


@given(text=text_strategy, chunk=st.integers(1, 40), val_fraction=st.sampled_from([0.0, 0.1, 0.5]))
def test_streamed_char_tokens_decode_to_the_input_for_any_block_size(tmp_path_factory, text, chunk, val_fraction):
    tmp_path = tmp_path_factory.mktemp("stream")
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    try:
        out, meta = _prepare(tmp_path, [tmp_path / "in.txt"], tokenizer="char", chunk_bytes=chunk,
                             val_fraction=val_fraction)
    except ValueError as err:  # a split left empty is reported, not silently accepted
        assert "split is empty" in str(err)
        return
    tokenizer = tokenizer_from_dict(meta["tokenizer"])
    val = _tokens(out, "val") if meta["splits"]["val"]["tokens"] else []
    train, val_text = tokenizer.decode(_tokens(out, "train")), tokenizer.decode(val)
    assert train + val_text == text
    raw = text.encode("utf-8")
    assert len(train.encode("utf-8")) >= int(len(raw) * (1 - val_fraction))  # cut at or after the byte


@given(text=text_strategy, chunk=st.integers(1, 40))
def test_streamed_gpt2_tokens_equal_tokenizing_the_whole_text(tmp_path_factory, monkeypatch_session, text, chunk):
    from minigpt.tokenizer import Tokenizer

    tmp_path = tmp_path_factory.mktemp("stream")
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    out, _ = _prepare(tmp_path, [tmp_path / "in.txt"], chunk_bytes=chunk, val_fraction=0.0, eos=False)
    assert _tokens(out, "train") == Tokenizer().encode(text)


@pytest.fixture(scope="module")
def monkeypatch_session():
    with pytest.MonkeyPatch.context() as mp:
        use_tiktoken_cache(mp)
        yield mp


def test_folder_and_jsonl_documents_are_separated_by_eos_and_sharded(tmp_path, monkeypatch):
    use_tiktoken_cache(monkeypatch)
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("Hello world")
    (docs / "sub" / "b.txt").write_text("Second file")
    (docs / ".hidden").write_text("never read")
    records = tmp_path / "r.jsonl"
    records.write_text("\n".join(json.dumps({"text": f"record {i}", "id": i}) for i in range(30)) + "\n\n")
    out, meta = _prepare(tmp_path, [docs, records], shard_tokens=16, val_fraction=0.2)
    assert meta["documents"] == 32 and meta["eos_between_documents"]
    assert [s["path"].rsplit("/", 1)[-1] for s in meta["sources"]] == ["a.txt", "b.txt", "r.jsonl"]
    assert len(meta["splits"]["train"]["shards"]) > 1
    from minigpt.tokenizer import Tokenizer

    tok = Tokenizer()
    ids = _tokens(out, "train") + _tokens(out, "val")
    assert tok.decode(ids).split("<|endoftext|>")[:3] == ["Hello world", "Second file", "record 0"]
    assert ids.count(tok.eos_id) == 32
    assert all(json.loads(r)["text"] in tok.decode(ids) for r in records.read_text().split("\n") if r)


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        _prepare(tmp_path, [tmp_path / "empty.txt"], tokenizer="char")


def test_undecodable_bytes_name_the_file_and_offset_unless_replaced(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n" * 10 + b"\xff\xfe oops")
    with pytest.raises(ValueError, match=r"bad\.txt: line 11, byte offset 100: .*--errors replace"):
        _prepare(tmp_path, [bad], tokenizer="char", chunk_bytes=7)
    _, meta = _prepare(tmp_path, [bad], tokenizer="char", errors="replace", val_fraction=0.0)
    assert "\ufffd" in meta["tokenizer"]["chars"]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"}\n{"text": broken}\n', r"line 2 is not valid JSON"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', r"line 3 has no 'text' field \(it has \['body'\]\)"),
    ('{"text": 5}\n', r"line 1: field 'text' is a int, not a string"),
    ("\n\n", r"holds no JSON records"),
])
def test_bad_jsonl_lines_are_reported_with_their_line_number(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(line)
    with pytest.raises(ValueError, match=message):
        _prepare(tmp_path, [path], tokenizer="char")


def test_missing_input_and_character_outside_the_alphabet(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _prepare(tmp_path, [tmp_path / "nope.txt"])
    (tmp_path / "t.txt").write_text("abcabcabcz")
    with pytest.raises(ValueError, match=r"character 'z' is not in the char tokenizer's alphabet"):
        _prepare(tmp_path, [tmp_path / "t.txt"], tokenizer="char", chars="abc")


def test_shard_that_disagrees_with_its_metadata_is_refused(tmp_path):
    (tmp_path / "t.txt").write_text("some text to tokenize " * 50)
    out, meta = _prepare(tmp_path, [tmp_path / "t.txt"], tokenizer="char")
    shard = out / meta["splits"]["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[0] ^= 1  # same size, different content: only the checksum sees it
    shard.write_bytes(bytes(data))
    TokenSplit(out, "train")
    with pytest.raises(ValueError, match="does not match the sha256"):
        TokenSplit(out, "train", verify=True)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(ValueError, match=r"has \d+ bytes but meta.json says \d+ uint16 tokens"):
        TokenSplit(out, "train")
    (out / "meta.json").unlink()  # what an interrupted prepare leaves
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        TokenSplit(out, "train")


def test_config_is_validated():
    with pytest.raises(ValueError, match="tokenizer='bpe'"):
        PrepareConfig(inputs=("x",), out_dir="o", tokenizer="bpe")
    with pytest.raises(ValueError, match="val_fraction=1.0"):
        PrepareConfig(inputs=("x",), out_dir="o", val_fraction=1.0)
    with pytest.raises(ValueError, match="eos=True"):
        PrepareConfig(inputs=("x",), out_dir="o", tokenizer="char", eos=True)


def test_cache_prepares_again_after_a_same_size_in_place_edit(tmp_path, caplog):
    from minigpt.pretrain.prepare import stale_reason
    from minigpt.pretrain.run import _already_prepared

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefghij" * 50)
    config = PrepareConfig(inputs=(str(corpus),), out_dir=str(tmp_path / "out"), tokenizer="char", progress=False)
    assert not _already_prepared(tmp_path / "out", config)
    meta = prepare(config)
    assert meta["sources"][0]["blake2b"] and _already_prepared(tmp_path / "out", config)
    size = corpus.stat().st_size
    corpus.write_text("jihgfedcba" * 50)  # same size, same alphabet, other tokens
    assert corpus.stat().st_size == size
    with caplog.at_level("INFO"):
        assert not _already_prepared(tmp_path / "out", config)
    assert "preparing" in caplog.text and "corpus.txt changed since it was prepared" in caplog.text
    assert "content hash" in stale_reason(tmp_path / "out", config)
    prepare(config)
    assert _already_prepared(tmp_path / "out", config)
    assert TokenSplit(tmp_path / "out", "train").arrays[0][0] == meta["tokenizer"]["chars"].index("j")


def test_a_bom_is_dropped_from_text_and_jsonl_inputs(tmp_path):
    (tmp_path / "a.txt").write_text("\ufeffabcabc\nabc\n", encoding="utf-8")
    out, meta = _prepare(tmp_path, [tmp_path / "a.txt"], tokenizer="char", val_fraction=0.0)
    assert meta["tokenizer"]["chars"] == "\nabc"  # no U+FEFF in the alphabet
    (tmp_path / "b.jsonl").write_text('\ufeff{"text": "abc"}\n{"text": "cab"}\n', encoding="utf-8")
    out, meta = _prepare(tmp_path, [tmp_path / "b.jsonl"], tokenizer="char", val_fraction=0.0)
    assert meta["documents"] == 2 and meta["tokenizer"]["chars"] == "abc"


def test_undecodable_byte_offset_counts_the_bom(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfab\xffcd\n")
    with pytest.raises(ValueError, match=r"a.txt: line 1, byte offset 5: cannot decode b'\\xff'.*--errors replace"):
        _prepare(tmp_path, [tmp_path / "a.txt"], tokenizer="char", val_fraction=0.0)
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl: line 1, byte offset 13: cannot decode b'\\xff'"):
        _prepare(tmp_path, [tmp_path / "b.jsonl"], tokenizer="char", val_fraction=0.0)


def test_prepare_config_values_are_type_checked_and_paths_expanded():
    with pytest.raises(ValueError, match=r"PrepareConfig.val_fraction='0.1' \(str\).*without quotes"):
        PrepareConfig(inputs=("x",), out_dir="o", val_fraction="0.1")
    with pytest.raises(ValueError, match="PrepareConfig.progress='no'"):
        PrepareConfig(inputs=("x",), out_dir="o", progress="no")
    with pytest.raises(ValueError, match="not one path"):
        PrepareConfig(inputs="x.txt", out_dir="o")
    config = PrepareConfig(inputs=[Path("~/x.txt")], out_dir="~/prepared")
    assert config.out_dir == os.path.expanduser("~/prepared")
    assert config.inputs == (os.path.expanduser("~/x.txt"),)
