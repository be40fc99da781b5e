"""The configs of pretraining: what `minigpt prepare` does (`PrepareConfig`), and a run's
four sections, each a frozen dataclass validated on construction:

    model   GPTConfig fields, plus `preset` (a name in minigpt.presets.PRESETS) to start from
    train   TrainConfig fields (minigpt.train.config)
    data    DataConfig fields (below)
    sample  SampleConfig fields: the text generated after training

They come, each overriding the last, from a recipe (`--preset`: minigpt.pretrain.recipes;
else the file's `preset`; else `DEFAULT_RECIPE`, tiny), a TOML or JSON file with the same
sections, and `--section.key=value` overrides (`--key=value` when the key names one field
in one section), through the one loader every run config uses (`minigpt.runconfig`).
Unknown sections and keys are errors that list the valid ones. File values must have
their field's type; command-line text is converted by it (`minigpt.typed`), and errors
name where the value came from. The effective config is saved as run_config.json in the
run folder, and that file is itself a valid `--config`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt.config import GPTConfig
from minigpt.pretrain.recipes import DEFAULT_RECIPE, recipe
from minigpt.runconfig import Section, load_sections, read_config_file
from minigpt.train.config import TrainConfig
from minigpt.typed import PathStr, check_fields

TOKENIZERS = ("gpt2", "char")
ERRORS = ("strict", "replace")


@dataclass(frozen=True)
class PrepareConfig:
    """What to tokenize and how."""

    inputs: tuple[PathStr, ...]
    """Text files, folders of them (searched recursively, hidden files skipped), or .jsonl files."""
    out_dir: PathStr
    """Folder that receives meta.json and the shards (earlier shards there are replaced)."""
    tokenizer: str = "gpt2"
    """'gpt2' (tiktoken BPE) or 'char' (one id per character)."""
    chars: str | None = None
    """The char tokenizer's alphabet; None collects it from the inputs (one extra pass)."""
    val_fraction: float = 0.1
    """Share of the input bytes, at the end, that becomes the validation split."""
    text_field: str = "text"
    """The field of each JSONL record that holds its text."""
    errors: str = "strict"
    """Undecodable UTF-8: 'strict' stops with the file and byte offset, 'replace' puts U+FFFD."""
    eos: bool | None = None
    """Put the end-of-text token after every document; unset (None), yes for gpt2 (char has none)."""
    shard_tokens: int = 100_000_000
    """Tokens per shard file, at most."""
    chunk_bytes: int = 1 << 20
    """Bytes read at a time from each file."""
    num_workers: int = 0
    """Tokenizer threads; 0 means one per CPU core."""
    progress: bool = True
    """Show a progress bar with tokens/s on a terminal, once preparing takes more than a moment."""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, (str, Path)):
            raise ValueError(f"inputs={self.inputs!r} must be a tuple of paths, not one path; "
                             f"write inputs=({str(self.inputs)!r},)")
        check_fields(self)  # every value has its field's type (minigpt.typed); `~` expanded
        if not self.inputs:
            raise ValueError(f"inputs={self.inputs!r} must name at least one file or folder")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer={self.tokenizer!r} is not supported; choose one of {TOKENIZERS}")
        if self.chars is not None and self.tokenizer != "char":
            raise ValueError(f"chars is set but tokenizer={self.tokenizer!r}; chars is for tokenizer='char'")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if self.errors not in ERRORS:
            raise ValueError(f"errors={self.errors!r} must be one of {ERRORS}")
        if self.eos and self.tokenizer == "char":
            raise ValueError("eos=True needs a tokenizer with an end-of-text token; the char tokenizer has none")
        for name in ("shard_tokens", "chunk_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0 (0 means one per core)")


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from."""

    path: PathStr | None = None
    """A folder from `minigpt prepare`, or text files / a folder / JSONL to prepare into
    out_dir/data; None trains on the tiny Shakespeare that ships with minigpt."""
    tokenizer: str = "char"
    """Tokenizer used when `path` still has to be prepared: 'char' or 'gpt2'."""
    val_fraction: float = 0.1
    """Share of the input held out for validation when preparing."""
    text_field: str = "text"
    """JSONL field holding the text, when preparing."""
    errors: str = "strict"
    """Undecodable UTF-8 when preparing: 'strict' or 'replace'."""
    verify: bool = False
    """Check every shard's sha256 against meta.json before training."""
    eval_seed: int = 0
    """Seed of the fixed validation windows (the same ones every evaluation)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer={self.tokenizer!r} must be one of {TOKENIZERS}")
        if self.errors not in ERRORS:
            raise ValueError(f"errors={self.errors!r} must be one of {ERRORS}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 1): training evaluates on it")


@dataclass(frozen=True)
class SampleConfig:
    """Text generated from the trained model at the end of the run."""

    tokens: int = 300
    """Tokens to generate; 0 skips sampling."""
    prompt: str = "\n"
    """Text to continue."""
    temperature: float = 0.8
    """Softmax temperature; 0 is greedy."""
    top_k: int | None = None
    """Sample from the k most likely tokens only."""
    seed: int = 0
    """Sampling seed."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.tokens < 0:
            raise ValueError(f"tokens={self.tokens!r} must be an integer >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1, or None (no limit)")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run needs."""

    model: GPTConfig
    train: TrainConfig
    data: DataConfig = DataConfig()
    sample: SampleConfig = SampleConfig()

    def __post_init__(self) -> None:
        check_fields(self)

    def to_dict(self) -> dict[str, dict]:
        return {"model": self.model.to_dict(), "train": self.train.to_dict(),
                "data": dataclasses.asdict(self.data), "sample": dataclasses.asdict(self.sample)}


def _model(values: dict[str, Any]) -> GPTConfig:
    """The model section: a preset's config with the given fields changed, or the fields alone."""
    preset = values.pop("preset", None)
    return GPTConfig.from_preset(preset, **values) if preset else GPTConfig(**values)


SECTIONS: dict[str, Section] = {
    "model": Section(GPTConfig, extra={"preset": str}, build=_model, restart_key="preset"),
    "train": Section(TrainConfig, required=("out_dir", "max_steps", "batch_size")),
    "data": Section(DataConfig),
    "sample": Section(SampleConfig),
}


def load_config(preset: str | None = None, file: str | Path | None = None,
                overrides: Sequence[str] = ()) -> PretrainConfig:
    """Recipe `preset` (else the file's `preset`, else DEFAULT_RECIPE), then `file`, then
    `overrides` ('section.key=value'), validated."""
    file_values = read_config_file(file) if file is not None else {}
    file_preset = file_values.pop("preset", None)
    if file_preset is not None and not isinstance(file_preset, str):
        raise ValueError(f"config file {file}: preset={file_preset!r} must be a recipe or preset name in quotes")
    name = preset or file_preset or DEFAULT_RECIPE
    return PretrainConfig(**load_sections(SECTIONS, recipe(name), name, file_values, file, overrides))
