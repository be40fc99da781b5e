"""Tokenizers: GPT-2's BPE through tiktoken, and a character-level one for teaching.

tiktoken downloads GPT-2's two BPE files on first use and caches them. Offline, point
``TIKTOKEN_CACHE_DIR`` at a folder holding that cache, or build the tokenizer from the
original ``encoder.json`` + ``vocab.bpe`` with ``Tokenizer.from_gpt2_files``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from minigpt.files import BadFileError, read_json

GPT2_EOS = "<|endoftext|>"

# tiktoken names each cached file by the sha1 of the URL it came from.
_GPT2_CACHE_FILES = {
    "6d1cbeee0f20b3d9449abfede4726ed8212e3aee": "vocab.bpe",
    "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6": "encoder.json",
}


class Tokenizer:
    """GPT-2's byte-level BPE (tiktoken's ``gpt2`` encoding).

    encode(text) -> list[int], decode(ids) -> str; ``eos_id`` is ``<|endoftext|>`` (50256).
    """

    name = "gpt2"

    def __init__(self, encoding=None) -> None:
        self._enc = encoding if encoding is not None else _load_gpt2_encoding()
        self.eos_id: int = self._enc.eot_token
        self.vocab_size: int = self._enc.n_vocab

    @classmethod
    def from_gpt2_files(cls, folder: str | Path) -> "Tokenizer":
        """Build from the original GPT-2 files ``encoder.json`` and ``vocab.bpe`` in `folder`."""
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        folder = Path(folder)
        missing = [n for n in ("encoder.json", "vocab.bpe") if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {missing}; it needs GPT-2's encoder.json and vocab.bpe")
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(folder / "vocab.bpe"), encoder_json_file=str(folder / "encoder.json")
        )
        # The same split pattern and special token as tiktoken's built-in "gpt2" encoding.
        enc = tiktoken.Encoding(
            name="gpt2-local",
            pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
            mergeable_ranks=ranks,
            special_tokens={GPT2_EOS: len(ranks)},
        )
        return cls(enc)

    def encode(self, text: str, allow_eos: bool = False) -> list[int]:
        """Token ids of `text`. ``<|endoftext|>`` in the text is plain text unless `allow_eos`."""
        if allow_eos:
            return self._enc.encode(text, allowed_special={GPT2_EOS})
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def to_dict(self) -> dict:
        return {"type": "gpt2"}


class CharTokenizer:
    """One id per character of a fixed alphabet (the classic char-level Shakespeare setup)."""

    name = "char"

    def __init__(self, chars: str | list[str]) -> None:
        self.chars = sorted(set(chars))
        if not self.chars:
            raise ValueError("CharTokenizer needs at least one character")
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self.eos_id: int | None = None

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str, allow_eos: bool = False) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as err:
            raise ValueError(
                f"character {err.args[0]!r} is not in this tokenizer's alphabet of {self.vocab_size} characters"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"type": "char", "chars": "".join(self.chars)}


def tokenizer_from_dict(data: dict):
    """Rebuild a tokenizer saved with ``to_dict`` (stored beside checkpoints and datasets)."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "gpt2":
        return Tokenizer()
    if kind == "char":
        if not isinstance(data.get("chars"), str) or not data["chars"]:
            raise ValueError("a char tokenizer needs its alphabet: a non-empty string under \"chars\"")
        return CharTokenizer(data["chars"])
    raise ValueError(f"unknown tokenizer type {kind!r}; expected 'gpt2' or 'char'")


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    (Path(folder) / "tokenizer.json").write_text(json.dumps(tokenizer.to_dict()))


def load_tokenizer(folder: str | Path):
    """The tokenizer saved beside a model (``tokenizer.json``), else GPT-2's."""
    path = Path(folder).expanduser() / "tokenizer.json"
    if not path.exists():
        return Tokenizer()
    try:
        return tokenizer_from_dict(read_json(path, "tokenizer file"))
    except BadFileError:
        raise
    except ValueError as err:
        raise BadFileError(f"tokenizer file {path}: {err}; re-save the model or restore the file") from None


class TokenizerFilesMissing(FileNotFoundError):
    """GPT-2's BPE files are neither in tiktoken's cache nor downloadable (offline)."""


def tiktoken_cache_dir() -> str:
    """The folder tiktoken reads its cached BPE files from (tiktoken.load.read_file_cached)."""
    import tempfile

    return (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
            or os.path.join(tempfile.gettempdir(), "data-gym-cache"))


def _load_gpt2_encoding():
    import tiktoken

    local = os.environ.get("MINIGPT_GPT2_BPE_DIR")
    if local:
        return Tokenizer.from_gpt2_files(local)._enc
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # tiktoken raises requests/OS errors when offline
        files = "\n".join(f"  {sha}  (GPT-2's {name})" for sha, name in _GPT2_CACHE_FILES.items())
        # `from None`: the chained network traceback (over a hundred lines) says nothing more.
        raise TokenizerFilesMissing(
            f"could not load GPT-2's BPE tokenizer: tiktoken looked for its cached files in {tiktoken_cache_dir()} "
            f"and could not download them ({type(err).__name__}; offline?).\n"
            "Either set TIKTOKEN_CACHE_DIR to a folder holding these files, named by the sha1 of their URL:\n"
            f"{files}\n"
            "or set MINIGPT_GPT2_BPE_DIR to a folder with GPT-2's original encoder.json and vocab.bpe, "
            "or use the char tokenizer (--tokenizer=char)."
        ) from None
