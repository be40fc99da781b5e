"""The corpus that ships inside the package: the main job's default, checked on every read."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from minigpt.cli import main
from minigpt.pretrain import corpora
from tests.helpers import DATA


def test_shipped_tiny_shakespeare_is_the_published_file():
    path = corpora.tiny_shakespeare()
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == corpora.TINY_SHAKESPEARE_SHA256
    text = data.decode("ascii")
    assert len(text) == corpora.TINY_SHAKESPEARE_CHARS and text.startswith("First Citizen:")
    assert len(set(text)) == 65 and text.count("\n") == 40_000
    shared = DATA / "tinyshakespeare" / "input.txt"
    if shared.is_file():  # beside this repository: the same bytes as the shared copy
        assert shared.read_bytes() == data


def test_a_changed_or_missing_corpus_is_refused_with_the_fix(tmp_path, monkeypatch):
    shutil.copy(corpora.CORPUS_DIR / "tinyshakespeare.txt", tmp_path / "tinyshakespeare.txt")
    monkeypatch.setattr(corpora, "CORPUS_DIR", tmp_path)
    with open(tmp_path / "tinyshakespeare.txt", "r+b") as f:  # one byte changed, same length
        f.seek(1000)
        f.write(b"#")
    with pytest.raises(ValueError, match=r"has sha256 [0-9a-f]{64}, expected 86c4e6aa.*reinstall minigpt, or pass --data"):
        corpora.tiny_shakespeare()
    (tmp_path / "tinyshakespeare.txt").unlink()
    with pytest.raises(FileNotFoundError, match="is missing: the minigpt install is incomplete.*--data PATH"):
        corpora.tiny_shakespeare()


def test_train_without_data_prepares_the_shipped_corpus_offline(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("the main job reached for the network")

    monkeypatch.setattr("socket.socket.connect", no_network)
    run = tmp_path / "run"
    main(["train", "--out-dir", str(run), "--max_steps=2", "--eval_interval=2", "--eval_steps=1",
          "--sample.tokens=5", "--progress=false", "--threads=1"])
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert meta["vocab_size"] == 65 and meta["sources"][0]["bytes"] == corpora.TINY_SHAKESPEARE_CHARS
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == corpora.TINY_SHAKESPEARE_CHARS
    assert capsys.readouterr().out.startswith("--- sample from ")
