"""Tokenizers: GPT-2's BPE through tiktoken, and a character-level one for teaching.

tiktoken downloads GPT-2's two BPE files on first use and caches them. Offline, point
``TIKTOKEN_CACHE_DIR`` at a folder holding that cache, or build the tokenizer from the
original ``encoder.json`` + ``vocab.bpe`` with ``Tokenizer.from_gpt2_files``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from minigpt.files import BadFileError, read_json

GPT2_EOS = "<|endoftext|>"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# tiktoken names each cached file by the sha1 of the URL it came from.
_GPT2_CACHE_FILES = {
    "6d1cbeee0f20b3d9449abfede4726ed8212e3aee": "vocab.bpe",
    "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6": "encoder.json",
}


class Tokenizer:
    """GPT-2's byte-level BPE (tiktoken's ``gpt2`` encoding), optionally with added special tokens.

    encode(text) -> list[int], decode(ids) -> str; ``eos_id`` is ``<|endoftext|>`` (50256).
    Added special tokens (``add_special_tokens``) take the ids after the base vocabulary
    (50257, 50258, ...), in the order they were added, as `transformers`'
    ``tokenizer.add_special_tokens`` assigns them; grow the model to match with
    `minigpt.finetune.run.add_tokens` (or ``GPT.resize_token_embeddings``).
    """

    name = "gpt2"

    def __init__(self, encoding=None, added_tokens: Sequence[str] = (), pad_token: str | None = None) -> None:
        self._base = encoding if encoding is not None else _load_gpt2_encoding()
        self._enc = self._base
        self.eos_id: int = self._base.eot_token
        self.added_tokens: tuple[str, ...] = ()
        self.pad_token: str | None = None
        """Token to pad batches with (recorded for `transformers`); None means eos."""
        self.add_special_tokens(added_tokens)
        if pad_token is not None:
            self.set_pad_token(pad_token)

    @property
    def vocab_size(self) -> int:
        """Base vocabulary plus added tokens: the rows a model needs."""
        return self._enc.n_vocab

    @property
    def base_vocab_size(self) -> int:
        return self._base.n_vocab

    @property
    def pad_id(self) -> int:
        """Id of `pad_token`, else eos (GPT-2 has no pad token of its own)."""
        return self.token_id(self.pad_token) if self.pad_token is not None else self.eos_id

    def add_special_tokens(self, tokens: Sequence[str]) -> list[str]:
        """Add `tokens` as special tokens (ids after the current vocabulary); return those that
        were new. Tokens already in the vocabulary as special tokens are skipped.

        Raises ValueError for a token that is not a non-empty string or is listed twice.
        """
        if isinstance(tokens, str):
            raise ValueError(f"add_special_tokens takes a list of tokens; got the string {tokens!r} "
                             f"(write [{tokens!r}])")
        new: list[str] = []
        for token in tokens:
            if not isinstance(token, str) or not token:
                raise ValueError(f"a special token must be a non-empty string; got {token!r}")
            if token in new:
                raise ValueError(f"special token {token!r} is listed twice")
            if token not in self._enc.special_tokens_set:
                new.append(token)
        if new:
            import tiktoken

            self.added_tokens = (*self.added_tokens, *new)
            base = self._base
            specials = dict(base._special_tokens)
            specials.update({t: base.n_vocab + i for i, t in enumerate(self.added_tokens)})
            self._enc = tiktoken.Encoding(name=f"{base.name}+{len(self.added_tokens)}", pat_str=base._pat_str,
                                          mergeable_ranks=base._mergeable_ranks, special_tokens=specials)
        return new

    def set_pad_token(self, token: str) -> None:
        """Pad batches with `token`, a special token of this tokenizer (add it first)."""
        self.token_id(token)
        self.pad_token = token

    def token_id(self, token: str) -> int:
        """Id of special token `token`; ValueError naming the known ones when it is not one."""
        try:
            return self._enc._special_tokens[token]
        except KeyError:
            raise ValueError(f"{token!r} is not a special token of this tokenizer (it has "
                             f"{sorted(self._enc.special_tokens_set)}); add it with add_special_tokens"
                             ) from None

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
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={GPT2_EOS: len(ranks)},
        )
        return cls(enc)

    def encode(self, text: str, allow_eos: bool = False, allow_added: bool = True) -> list[int]:
        """Token ids of `text`. ``<|endoftext|>`` in the text is plain text unless `allow_eos`;
        added special tokens are recognized (as `transformers` does) unless not `allow_added`."""
        allowed = set(self.added_tokens) if allow_added else set()
        if allow_eos:
            allowed.add(GPT2_EOS)
        if allowed:
            return self._enc.encode(text, allowed_special=allowed, disallowed_special=())
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        if self.added_tokens:
            return self._enc.encode_batch(texts, num_threads=num_threads, allowed_special=set(self.added_tokens),
                                          disallowed_special=())
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def to_dict(self) -> dict:
        out: dict = {"type": "gpt2"}
        if self.added_tokens:
            out["added_tokens"] = list(self.added_tokens)
        if self.pad_token is not None:
            out["pad_token"] = self.pad_token
        return out


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
        return Tokenizer(added_tokens=data.get("added_tokens", ()), pad_token=data.get("pad_token"))
    if kind == "char":
        if not isinstance(data.get("chars"), str) or not data["chars"]:
            raise ValueError("a char tokenizer needs its alphabet: a non-empty string under \"chars\"")
        return CharTokenizer(data["chars"])
    raise ValueError(f"unknown tokenizer type {kind!r}; expected 'gpt2' or 'char'")


def save_tokenizer(tokenizer, folder: str | Path, model_max_length: int | None = None) -> None:
    """Save `tokenizer` beside a model in `folder`.

    GPT-2's is written as the files `transformers`' GPT2Tokenizer reads (vocab.json,
    merges.txt, tokenizer_config.json, ...; see `minigpt.hf_tokenizer`), added tokens
    included, so AutoTokenizer loads the folder. Others are minigpt's ``tokenizer.json``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    own = folder / "tokenizer.json"
    if isinstance(tokenizer, Tokenizer):
        from minigpt.hf_tokenizer import write_gpt2_tokenizer

        write_gpt2_tokenizer(tokenizer, folder, model_max_length)
        # A minigpt tokenizer.json left from an earlier save would shadow these files (and
        # transformers would try to read it as its own tokenizer.json).
        if own.is_file():
            try:
                ours = "type" in read_json(own, "tokenizer file")
            except BadFileError:
                ours = True  # a damaged file would only stand in the way
            if ours:
                own.unlink()
        return
    own.write_text(json.dumps(tokenizer.to_dict()))


def tokenizer_files(tokenizer, model_max_length: int | None = None) -> dict[str, str]:
    """{file name: text} that `save_tokenizer` would write, for a checkpoint that is filled
    from texts (the training loop's ``checkpoint_files``): GPT-2's as the files
    `transformers` reads, so AutoTokenizer loads a pretraining checkpoint too; others as
    minigpt's ``tokenizer.json``."""
    if isinstance(tokenizer, Tokenizer):
        from minigpt.hf_tokenizer import gpt2_tokenizer_files

        return gpt2_tokenizer_files(tokenizer, model_max_length)
    return {"tokenizer.json": json.dumps(tokenizer.to_dict())}


def load_tokenizer(folder: str | Path):
    """The tokenizer saved beside a model: minigpt's ``tokenizer.json``, else GPT-2's with the
    added tokens that tokenizer_config.json (or a `tokenizers` tokenizer.json) lists, else GPT-2's.
    The folder's files are read once each (`minigpt.hf_tokenizer.read_saved_tokenizer`).

    Raises BadFileError naming tokenizer.json when it is not JSON or not a tokenizer, and
    when the folder's tokenizer files give more ids than its model has (`check_fits_model`);
    ValueError when the added ids do not follow the base vocabulary without gaps, which a
    GPT-2 tokenizer cannot represent."""
    from minigpt.hf_tokenizer import read_saved_tokenizer

    folder = Path(folder).expanduser()
    saved = read_saved_tokenizer(folder)
    tokenizer = _tokenizer_from_saved(saved)
    check_fits_model(tokenizer, saved.model_vocab_size, folder)
    return tokenizer


def _tokenizer_from_saved(saved):
    if saved.own is not None:
        try:
            return tokenizer_from_dict(saved.own)
        except ValueError as err:
            raise BadFileError(f"tokenizer file {saved.source}: {err}; re-save the model or restore the file") from None
    tokenizer = Tokenizer()
    base = tokenizer.base_vocab_size
    added = {i: t for i, t in saved.added.items() if i >= base}
    expected = list(range(base, base + len(added)))
    if sorted(added) != expected:
        raise ValueError(f"{saved.source}: added token ids {sorted(added)} must follow the base vocabulary of "
                         f"{base} without gaps ({expected}); re-add the tokens in order")
    tokenizer.add_special_tokens([added[i] for i in expected])
    if saved.pad is not None and saved.pad in tokenizer.added_tokens:
        tokenizer.set_pad_token(saved.pad)
    return tokenizer


def check_fits_model(tokenizer, vocab_size, folder: str | Path) -> None:
    """BadFileError unless every id `tokenizer` gives is below the model's `vocab_size`:
    checked where a model and its tokenizer meet (loading a folder, fine-tuning's --init),
    before anything runs, where a mismatch would otherwise fail mid-training with
    "token id ... out of range"."""
    if isinstance(vocab_size, int) and not isinstance(vocab_size, bool) and tokenizer.vocab_size > vocab_size:
        raise BadFileError(
            f"{folder}: its tokenizer gives {tokenizer.vocab_size} ids but the model has vocab_size={vocab_size}, "
            f"so text would encode to ids the model has no embedding for. The tokenizer beside the model is not "
            f"the one it was trained with: restore the folder's tokenizer files, or start from the model folder "
            f"they belong to")


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
