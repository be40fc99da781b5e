"""GPT-2's tokenizer in the files `transformers` reads, written and read without it.

`transformers`' ``GPT2Tokenizer`` reads a folder holding

    vocab.json               {token string: id}, bytes shown through GPT-2's byte-to-unicode table
    merges.txt               "#version: 0.2" then one merge per line, "a b", in priority order
    tokenizer_config.json    the class, eos/bos/unk/pad, and ``added_tokens_decoder`` {id: token}
    special_tokens_map.json  eos/bos/unk/pad and ``additional_special_tokens``
    added_tokens.json        {added token: id} (the older place transformers looked)

tiktoken keeps GPT-2's BPE as ranks of byte strings, not merges, so the merges are
recovered from the ranks: the token of rank r is the merge of the two pieces that BPE,
using only ranks below r, leaves of its bytes. For GPT-2 this gives back the original
vocab.bpe line for line (tested).

Reading goes one way: `read_saved_tokenizer` reads a folder's tokenizer files once each
(minigpt's own tokenizer.json among them) into a `SavedTokenizer`, which
`minigpt.tokenizer.load_tokenizer` builds the tokenizer from.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from minigpt.files import read_json

TOKENIZER_CONFIG = "tokenizer_config.json"
FILES = ("vocab.json", "merges.txt", TOKENIZER_CONFIG, "special_tokens_map.json", "added_tokens.json")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from bytes to printable characters (Radford et al.'s encoder.py):
    printable Latin-1 bytes stand for themselves, the rest map to code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two pieces BPE leaves of `token` when it may only use merges ranked below `rank`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens; "
                         f"these BPE ranks cannot be written as merges.txt")
    return parts[0], parts[1]


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    show = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(show[x] for x in b)

    vocab = {text(token): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    merges = [" ".join(text(p) for p in _merge_of(token, rank, ranks))
              for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]) if len(token) > 1]
    return vocab, merges


@functools.lru_cache(maxsize=2)
def _base_files(encoding) -> tuple[str, str]:
    """(vocab.json, merges.txt) texts of an encoding; cached, as recovering merges takes ~1 s."""
    vocab, merges = _vocab_and_merges(encoding._mergeable_ranks)
    vocab.update(encoding._special_tokens)
    return (json.dumps(vocab, ensure_ascii=False) + "\n", "#version: 0.2\n" + "\n".join(merges) + "\n")


def _added_token(token: str) -> dict:
    # "normalized": False and no stripping: the token matches exactly, as tiktoken matches it.
    return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def gpt2_tokenizer_files(tokenizer, model_max_length: int | None = None) -> dict[str, str]:
    """{file name: text} of the files listed in the module docstring for `tokenizer` (a
    minigpt GPT-2 `Tokenizer`); added_tokens.json only when there are added tokens.

    The output is a function of the tokenizer alone, so saving twice gives the same bytes.
    """
    vocab_text, merges_text = _base_files(tokenizer._base)
    eos = tokenizer._base.decode([tokenizer.eos_id])
    base = tokenizer.base_vocab_size
    added = {token: base + i for i, token in enumerate(tokenizer.added_tokens)}
    roles = {"bos_token": eos, "eos_token": eos, "unk_token": eos}
    if tokenizer.pad_token is not None:
        roles["pad_token"] = tokenizer.pad_token
    special_map = {**roles, **({"additional_special_tokens": list(added)} if added else {})}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "add_bos_token": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or 1024,
        **special_map,
        "added_tokens_decoder": {str(tokenizer.eos_id): _added_token(eos),
                                 **{str(i): _added_token(t) for t, i in added.items()}},
    }

    def dump(value) -> str:
        return json.dumps(value, indent=2, ensure_ascii=False) + "\n"

    files = {"vocab.json": vocab_text, "merges.txt": merges_text, TOKENIZER_CONFIG: dump(config),
             "special_tokens_map.json": dump(special_map)}
    if added:
        files["added_tokens.json"] = dump(added)
    return files


def write_gpt2_tokenizer(tokenizer, folder: str | Path, model_max_length: int | None = None) -> None:
    """Write `tokenizer` (a minigpt GPT-2 `Tokenizer`) as the files listed in the module docstring."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = gpt2_tokenizer_files(tokenizer, model_max_length)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    if "added_tokens.json" not in files:
        (folder / "added_tokens.json").unlink(missing_ok=True)


@dataclass(frozen=True)
class SavedTokenizer:
    """What the tokenizer files beside a model say (`read_saved_tokenizer`), each read once."""

    source: Path | None
    """The file it was read from (for messages); None when the folder has no tokenizer file."""
    own: dict | None
    """minigpt's own tokenizer.json (``{"type": ...}``, for `tokenizer_from_dict`), else None."""
    added: dict[int, str] = field(default_factory=dict)
    """GPT-2's added tokens by id, as tokenizer_config.json (or a `tokenizers` tokenizer.json) lists them."""
    pad: str | None = None
    """The pad token tokenizer_config.json names."""
    model_vocab_size: int | None = None
    """config.json's vocab_size, read when the folder has tokenizer files of its own, to check them against."""


def read_saved_tokenizer(folder: str | Path) -> SavedTokenizer:
    """The tokenizer files of a model folder, in one pass: minigpt's tokenizer.json, else
    GPT-2's with the added tokens that tokenizer_config.json lists (or, for folders saved by
    `tokenizers`, tokenizer.json's ``added_tokens``); and the model's vocab_size beside them.

    Raises BadFileError (`minigpt.files.read_json`) naming a file that is not JSON or not an object.
    """
    folder = Path(folder)
    config_file = folder / TOKENIZER_CONFIG
    fast_file = folder / "tokenizer.json"
    fast = read_json(fast_file, "tokenizer file") if fast_file.exists() else None
    model_config = folder / "config.json"
    vocab_size = None
    if (fast is not None or config_file.is_file()) and model_config.is_file():
        vocab_size = read_json(model_config, "model config").get("vocab_size")
    if fast is not None and "type" in fast:
        return SavedTokenizer(fast_file, fast, model_vocab_size=vocab_size)
    if config_file.is_file():
        config = read_json(config_file, "tokenizer config")
        pad = config.get("pad_token")
        return SavedTokenizer(config_file, None,
                              {int(i): entry["content"] for i, entry in config.get("added_tokens_decoder", {}).items()},
                              pad.get("content") if isinstance(pad, dict) else pad, vocab_size)
    if fast is not None:
        return SavedTokenizer(fast_file, None, {e["id"]: e["content"] for e in fast.get("added_tokens", [])},
                              model_vocab_size=vocab_size)
    return SavedTokenizer(None, None)
