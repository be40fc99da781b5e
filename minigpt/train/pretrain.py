"""Pretraining set-up: a config from a recipe, a file and overrides; data; model; `train`; a sample.

A run is configured by four sections, each a frozen dataclass validated on construction:

    model   GPTConfig fields, plus `preset` (a name in minigpt.config.PRESETS) to start from
    train   TrainConfig fields (minigpt.train.loop)
    data    DataConfig fields (below)
    sample  SampleConfig fields: the text generated after training

They come, each overriding the last, from a recipe (`--preset`: `RECIPES`, or any model
preset with `DEFAULT_TRAIN`; else the file's `preset`; else `DEFAULT_RECIPE`, tiny), a TOML
or JSON file with the same sections, and `--section.key=value` overrides (`--key=value`
when the key names one field in one section). Unknown sections and keys are errors that
list the valid ones. File values must have their field's type; command-line text is
converted by it (`minigpt.typed`), and errors name where the value came from. The effective
config is saved as run_config.json in the run folder, and that file is itself a valid
`--config`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigpt.config import PRESETS, GPTConfig, reject_unknown_keys
from minigpt.data.dataset import FixedWindows, RandomWindows, TokenSplit
from minigpt.data.prepare import ERRORS, TOKENIZERS, PrepareConfig, check_outside_inputs, prepare, stale_reason
from minigpt.device import check_device, memory_bytes
from minigpt.files import existing_file, read_json, read_toml
from minigpt.train import distributed as dist_
from minigpt.train import runfolder
from minigpt.train.loop import TrainConfig, TrainResult, train
from minigpt.typed import PathStr, check_fields, check_value, field_types, parse_cli

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from."""

    path: PathStr | None = None
    """A folder from `minigpt prepare`, or text files / a folder / JSONL to prepare into
    out_dir/data; None downloads tiny Shakespeare (once, into ~/.cache/minigpt)."""
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


# The README's main job: character-level tiny Shakespeare on a 2-core CPU in under two
# minutes, to a validation loss below 1.70 (issue 9). Tuned by measurement, see
# benchmarks/NOTES.md: Muon gets far lower than AdamW in the same updates (1.705 vs 1.923
# after 600 at batch 16 x 128); batch 32 x 64 keeps step time and memory small.
TINY_TRAIN: dict[str, Any] = dict(
    out_dir="runs/tiny",
    max_steps=500,
    batch_size=32,
    optimizer="muon",
    lr=1e-2,
    min_lr=1e-3,
    warmup_steps=30,
    weight_decay=0.1,
    beta2=0.99,
    grad_clip=1.0,
    eval_interval=100,
    eval_steps=20,
    log_interval=10,
    checkpoint_interval=0,
    device="cpu",
)

# A GPT-2-style recipe (nanoGPT's train_gpt2: ~0.5M tokens per update at block 1024).
DEFAULT_TRAIN: dict[str, Any] = dict(
    max_steps=600_000,
    batch_size=12,
    grad_accum=40,
    lr=6e-4,
    min_lr=6e-5,
    warmup_steps=2000,
    weight_decay=0.1,
    beta2=0.95,
    eval_interval=1000,
    eval_steps=200,
    checkpoint_interval=1000,
)

# nanoGPT's documented CPU run of shakespeare_char (its README: config/train_shakespeare_char.py
# with --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
# --lr_decay_iters=2000 --dropout=0.0 --eval_iters=20), restated as a minigpt recipe so the
# main job can be compared with it on the same machine (scripts/cpu.py --cases main).
NANOGPT_CPU: dict[str, dict[str, Any]] = {
    "model": {"vocab_size": 65, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128,
              "dropout": 0.0, "bias": False, "qkv_bias": False, "activation": "gelu"},
    "train": dict(out_dir="runs/nanogpt-cpu", max_steps=2000, batch_size=12, lr=1e-3, min_lr=1e-4,
                  warmup_steps=100, weight_decay=0.1, decay_embeddings=True, beta2=0.99, grad_clip=1.0,
                  eval_interval=250, eval_steps=20, log_interval=10, checkpoint_interval=0, device="cpu"),
    "data": {"tokenizer": "char"},
    "sample": {"tokens": 500, "prompt": "\n"},
}

# The first half of "pretrain, then fine-tune" on a laptop: the tiny recipe's shape with
# GPT-2's BPE vocabulary and a 128-token context, so its run folder is a base for
# `minigpt finetune` on any text GPT-2's tokenizer reads. With 50,257 tokens the LM head is
# most of the compute (39 of the 45 MFLOPs a trained token costs, `minigpt inspect`), so a
# batch is only 8 x 128 tokens and a few hundred Muon updates take a few CPU minutes; see
# benchmarks/results/first_hour.md for what the pretraining buys a classifier.
TINY_BPE: dict[str, dict[str, Any]] = {
    "model": {"preset": "tiny", "vocab_size": 50257, "block_size": 128, "attention_window": 64},
    "train": {**TINY_TRAIN, "out_dir": "runs/tiny-bpe", "max_steps": 300, "batch_size": 8, "warmup_steps": 20,
              "eval_interval": 100, "eval_steps": 10},
    "data": {"tokenizer": "gpt2"},
    "sample": {"tokens": 40, "prompt": "The"},
}

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "model": {"preset": "tiny"},
        "train": TINY_TRAIN,
        "data": {"tokenizer": "char"},
        "sample": {"tokens": 500, "prompt": "\n"},
    },
    "tiny-bpe": TINY_BPE,
    "nanogpt-cpu": NANOGPT_CPU,
}

SECTIONS = {"model": GPTConfig, "train": TrainConfig, "data": DataConfig, "sample": SampleConfig}
DEFAULT_RECIPE = "tiny"
"""What a run starts from when neither --preset nor the config file names a preset."""


def recipe(name: str) -> dict[str, dict[str, Any]]:
    """The starting config of `--preset name`: a tuned recipe, or a model preset with DEFAULT_TRAIN."""
    if name in RECIPES:
        return json.loads(json.dumps(RECIPES[name]))
    if name in PRESETS:
        return {"model": {"preset": name}, "train": {"out_dir": f"runs/{name}", **DEFAULT_TRAIN},
                "data": {"tokenizer": "gpt2"}}
    raise ValueError(f"unknown preset {name!r}; choose a recipe ({', '.join(RECIPES)}) or a model preset "
                     f"({', '.join(PRESETS)})")


def _section_types(section: str) -> dict[str, Any]:
    """Key -> declared type of one section (the model section also takes `preset`)."""
    types = dict(field_types(SECTIONS[section]))
    return {**types, "preset": str} if section == "model" else types


def _section_fields(section: str) -> set[str]:
    return set(_section_types(section))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (Python >= 3.11) or JSON config file as a dict of sections.

    Raises FileNotFoundError when it is absent and ValueError (naming the file, and the
    line for syntax errors) when it cannot be read.
    """
    path = existing_file(path, "config file")
    if path.suffix.lower() == ".toml":
        return read_toml(path, "config file")
    if path.suffix.lower() == ".json":
        return read_json(path, "config file")
    raise ValueError(f"config file {path} must end in .toml or .json")


def apply_override(sections: dict[str, dict[str, Any]], item: str,
                   origins: dict[tuple[str, str], str] | None = None) -> None:
    """Apply one 'section.key=value' or 'key=value' (leading dashes and '-' in keys allowed).

    The text is converted by the key's declared type (`minigpt.typed.parse_cli`); a bare
    `--flag` means true and is only allowed for booleans.
    """
    item = item.lstrip("-")
    key, sep, value = item.partition("=")
    key = key.replace("-", "_")
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ValueError(f"override {item!r}: unknown section {section!r}; sections are {', '.join(SECTIONS)}")
        if name not in _section_fields(section):
            raise ValueError(f"override {item!r}: {section} has no key {name!r}; valid keys are: "
                             f"{', '.join(sorted(_section_fields(section)))}")
    else:
        owners = [s for s in SECTIONS if key in _section_fields(s)]
        if not owners:
            valid = "; ".join(f"{s}: {', '.join(sorted(_section_fields(s)))}" for s in SECTIONS)
            raise ValueError(f"override {item!r}: no section has a key {key!r}. Valid keys are {valid}")
        if len(owners) > 1:
            raise ValueError(f"override {item!r}: {key!r} is in several sections; write "
                             + " or ".join(f"--{s}.{key}=..." for s in owners))
        section, name = owners[0], key
    flag = f"--{section}.{name}"
    tp = _section_types(section)[name]
    if sep:
        parsed = parse_cli(value, tp, flag)
    elif tp is bool:
        parsed = True  # a bare --flag means true
    else:
        raise ValueError(f"{flag} needs a value, e.g. {flag}=... (only true/false keys may be given bare)")
    sections.setdefault(section, {})[name] = parsed
    if origins is not None:
        origins[(section, name)] = flag


def _syntax(origin: str | None) -> str:
    origin = (origin or "").lower()
    return "toml" if origin.endswith(".toml") else "json" if origin.endswith(".json") else "python"


def _build_section(section: str, values: dict[str, Any], origins: dict[tuple[str, str], str]) -> Any:
    """One section's dataclass; errors name where the offending value came from."""
    cls = SECTIONS[section]
    if not isinstance(values, dict):
        raise ValueError(f"[{section}] must be a table of key = value pairs; got {values!r}")
    reject_unknown_keys(cls, {k: v for k, v in values.items() if not (section == "model" and k == "preset")})
    types = _section_types(section)
    checked = {}
    for name, value in values.items():
        origin = origins.get((section, name))
        try:
            checked[name] = check_value(value, types[name], name, owner=section, syntax=_syntax(origin))
        except ValueError as err:
            raise ValueError(f"{err} (from {origin})" if origin else str(err)) from None
    try:
        if section == "model":
            preset = checked.pop("preset", None)
            return GPTConfig.from_preset(preset, **checked) if preset else GPTConfig(**checked)
        return cls(**checked)
    except ValueError as err:
        named = re.match(r"(\w+)=", str(err))
        origin = origins.get((section, named.group(1))) if named else None
        raise ValueError(f"[{section}] {err}{f' (from {origin})' if origin else ''}") from None


def build_config(sections: dict[str, Any], origins: dict[tuple[str, str], str] | None = None) -> PretrainConfig:
    """Validate a dict of sections into a PretrainConfig; `origins` maps (section, key) to
    where each value came from (a file, a flag), for the error messages."""
    origins = origins or {}
    unknown = sorted(set(sections) - set(SECTIONS) - {"preset"})
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; valid sections are: {', '.join(SECTIONS)}")
    train_values = dict(sections.get("train") or {})
    for name in ("out_dir", "max_steps", "batch_size"):
        if name not in train_values:
            raise ValueError(f"train.{name} is required (set it in the config file or with --train.{name}=...)")
    return PretrainConfig(**{section: _build_section(section, dict(sections.get(section) or {}), origins)
                             for section in SECTIONS})


def load_config(preset: str | None = None, file: str | Path | None = None,
                overrides: Sequence[str] = ()) -> PretrainConfig:
    """Recipe `preset` (else the file's `preset`, else DEFAULT_RECIPE), then `file`, then
    `overrides` ('section.key=value'), validated."""
    file_values = read_config_file(file) if file is not None else {}
    origins: dict[tuple[str, str], str] = {}
    file_preset = file_values.pop("preset", None)
    if file_preset is not None and not isinstance(file_preset, str):
        raise ValueError(f"config file {file}: preset={file_preset!r} must be a recipe or preset name in quotes")
    name = preset or file_preset or DEFAULT_RECIPE
    sections = recipe(name)
    for section, values in sections.items():
        origins.update({(section, key): f"recipe {name!r}" for key in values})
    for section, values in file_values.items():
        if section not in SECTIONS:
            owners = [s for s in SECTIONS if section in _section_fields(s)]
            if owners and not isinstance(values, dict):  # `lr = 1e-3` written above every [section]
                raise ValueError(f"config file {file}: {section!r} is at the top level, outside any section; put it "
                                 f"under [{owners[0]}]" + (f" (or [{'] or ['.join(owners[1:])}])" if owners[1:] else ""))
            raise ValueError(f"config file {file}: unknown section {section!r}; valid sections are: "
                             f"{', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ValueError(f"config file {file}: section {section!r} must be a table of key = value pairs "
                             f"(in TOML: [{section}] followed by key = value lines), not {values!r}")
        try:
            reject_unknown_keys(SECTIONS[section], {k: v for k, v in values.items() if (section, k) != ("model", "preset")})
        except ValueError as err:
            raise ValueError(f"config file {file}: [{section}] {err}") from None
        if section == "model" and "preset" in values:
            sections["model"] = {}  # a new model preset replaces the recipe's model
        sections.setdefault(section, {}).update(values)
        origins.update({(section, key): str(Path(file)) for key in values})
    for item in overrides:
        apply_override(sections, item, origins)
    return build_config(sections, origins)


@dataclass
class PretrainResult:
    """What `pretrain` returns."""

    train: TrainResult
    run_dir: Path
    data_dir: Path
    sample: str | None


def _data_folder(config: PretrainConfig, info: dist_.DistInfo) -> Path:
    """A prepared dataset folder for config.data.path (preparing raw text into out_dir/data)."""
    data = config.data
    if data.path is not None and (Path(data.path) / "meta.json").is_file():
        return Path(data.path)
    if data.path is None:
        from minigpt.data.corpora import tiny_shakespeare

        inputs = (str(tiny_shakespeare()),) if info.is_main else ()
    else:
        inputs = (data.path,)
    folder = Path(config.train.out_dir) / "data"
    if info.is_main:
        prep = PrepareConfig(inputs=inputs, out_dir=str(folder), tokenizer=data.tokenizer,
                             val_fraction=data.val_fraction, text_field=data.text_field, errors=data.errors,
                             progress=False)
        if not _already_prepared(folder, prep):
            prepare(prep)
    dist_.barrier()
    return folder


def _already_prepared(folder: Path, prep: PrepareConfig) -> bool:
    """Whether `folder` holds a preparation of exactly these inputs (same bytes, by content
    hash); when it holds another, say why it is prepared again."""
    reason = stale_reason(folder, prep)
    if reason is not None and (folder / "meta.json").is_file():
        logger.info("preparing %s again: %s", folder, reason)
    return reason is None


def pretrain(config: PretrainConfig, resume: bool = False, overwrite: bool = False) -> PretrainResult:
    """Prepare or open the data, build the model, train it, and sample from it (rank 0).

    The run folder is claimed first (minigpt.train.runfolder): a folder that holds another
    run is refused unless `resume` or `overwrite` (which moves the old run aside). Every
    rank leaves the process group when training ends, also on an error; the sample is
    drawn afterwards on rank 0 alone, from the final checkpoint when the model is sharded.

    Raises ValueError when the data's vocabulary does not fit the model, and whatever
    `prepare` and `train` raise.
    """
    check_device(config.train.device)
    check_memory_fits(config)
    run_dir = Path(config.train.out_dir)
    if config.data.path is not None and not (Path(config.data.path) / "meta.json").is_file():
        check_outside_inputs((config.data.path,), run_dir, "train.out_dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"train.out_dir={str(run_dir)!r} is a file; the run folder must be a folder (choose another "
                         f"--out-dir)")
    info = dist_.setup(config.train.device)
    try:
        with runfolder.claim(run_dir, resume=resume, overwrite=overwrite, is_main=info.is_main):
            result, model, tokenizer, data_dir = _pretrain(config, info, resume)
    except BaseException:
        dist_.teardown(sync=False)
        raise
    dist_.teardown()
    text = None
    if info.is_main and config.sample.tokens > 0:
        from minigpt.generate import generate_text
        from minigpt.model import GPT

        if dist_.resolve_parallel(config.train.parallel, info) == "fsdp":  # sharded: read the gathered copy
            model = GPT.from_pretrained(result.last_checkpoint)
        model.eval()
        s = config.sample
        text = s.prompt + generate_text(model, tokenizer, s.prompt, s.tokens, temperature=s.temperature,
                                        top_k=s.top_k, seed=s.seed)[0]
    return PretrainResult(train=result, run_dir=run_dir, data_dir=data_dir, sample=text)


def warn_eval_cost(tc: TrainConfig, block_size: int, val_tokens: int) -> None:
    """Warn when `eval_steps` is out of proportion: each evaluation draws eval_steps random
    windows, so reading more tokens than the validation split holds scores the same text
    again (no better an estimate, only slower), and evaluations that together cost more than
    the training steps (an update is about 3 forward passes) make a run mostly evaluation.
    Not an error: a user may want it, but should not get it without a word."""
    per_eval = tc.eval_steps * tc.batch_size * block_size
    enough = max(1, -(-val_tokens // (tc.batch_size * block_size)))
    if per_eval > 2 * val_tokens and enough < tc.eval_steps:
        logger.warning("train.eval_steps=%d reads %s tokens per evaluation, %.0fx the validation split's %s: "
                       "the same text is scored again and again, which only makes evaluation slower; "
                       "--train.eval_steps=%d reads it about once", tc.eval_steps, f"{per_eval:,}",
                       per_eval / max(1, val_tokens), f"{val_tokens:,}", enough)
    evaluations = tc.max_steps // tc.eval_interval + (tc.max_steps % tc.eval_interval != 0)
    if evaluations * tc.eval_steps > 3 * tc.max_steps * tc.grad_accum:
        logger.warning("evaluation will take longer than training: %d evaluations of %d batches (eval_interval=%d) "
                       "against %d updates; lower --train.eval_steps or raise --train.eval_interval",
                       evaluations, tc.eval_steps, tc.eval_interval, tc.max_steps)


def check_memory_fits(config: PretrainConfig) -> None:
    """Refuse, before anything is prepared or built, a run whose smallest possible training
    step (`counts.training_bytes_lower_bound`) exceeds the device's whole memory: it would
    only end, minutes later, in an allocator traceback. Runs that may fit are let through."""
    from minigpt.counts import training_bytes_lower_bound

    total = memory_bytes(config.train.device)
    if total is None:
        return
    m, tc = config.model, config.train
    need = training_bytes_lower_bound(m, tc.batch_size)
    if need <= total:
        return
    gib = 1 << 30
    per_sequence = max(1, training_bytes_lower_bound(m, 1) - training_bytes_lower_bound(m, 0))
    fits = (total - training_bytes_lower_bound(m, 0)) // per_sequence
    hint = (f"--train.batch_size={fits} or lower (with --train.grad_accum to keep the batch)" if fits >= 1
            else "a smaller --model.block_size, --model.n_embd or --model.n_layer")
    raise ValueError(
        f"model.block_size={m.block_size} with train.batch_size={tc.batch_size} (n_layer={m.n_layer}, "
        f"n_embd={m.n_embd}, vocab_size={m.vocab_size}) needs at least {need / gib:.1f} GiB to train, more than "
        f"the {total / gib:.1f} GiB of memory of device {tc.device!r}; try {hint}")


def _pretrain(config: PretrainConfig, info: dist_.DistInfo, resume: bool) -> tuple[TrainResult, torch.nn.Module, object, Path]:
    """(train result, trained model, tokenizer, data folder): everything but the sample."""
    run_dir = Path(config.train.out_dir)
    data_dir = _data_folder(config, info)
    train_split = TokenSplit(data_dir, "train", verify=config.data.verify)
    val_split = TokenSplit(data_dir, "val", verify=config.data.verify)
    if train_split.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"the data's tokenizer has {train_split.vocab_size} ids but model.vocab_size={config.model.vocab_size}; "
            f"set --model.vocab_size={train_split.vocab_size}"
            + (" (or start from --preset tiny-bpe, the tiny recipe with GPT-2's vocabulary)"
               if train_split.vocab_size == 50257 else "")
        )
    block, tc = config.model.block_size, config.train
    batches = RandomWindows(train_split, block, tc.batch_size, seed=tc.seed, rank=info.rank,
                            world_size=info.world_size)
    evals = FixedWindows(val_split, block, tc.batch_size, tc.eval_steps, seed=config.data.eval_seed,
                         rank=info.rank, world_size=info.world_size)
    if info.is_main:
        warn_eval_cost(tc, block, len(val_split))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    from minigpt.model import GPT
    from minigpt.tokenizer import tokenizer_files, tokenizer_from_dict

    torch.manual_seed(tc.seed)  # the initial weights
    model = GPT(config.model)
    tokenizer = tokenizer_from_dict(train_split.tokenizer)
    if config.sample.tokens > 0:  # find out now, not after the whole run
        try:
            tokenizer.encode(config.sample.prompt)
        except ValueError as err:
            raise ValueError(f"sample.prompt={config.sample.prompt!r} cannot be encoded by the data's tokenizer ({err}); "
                             f"change --sample.prompt or set --sample.tokens=0") from None
    meta = train_split.meta
    run_metadata = {"model": config.model.to_dict(),
                    "data": {"tokenizer": meta["tokenizer"], "dtype": meta["dtype"],
                             "train_tokens": meta["splits"]["train"]["tokens"],
                             "val_tokens": meta["splits"]["val"]["tokens"]}}
    result = train(model, tc, batches, eval_batches=evals, resume=resume, run_metadata=run_metadata,
                   checkpoint_files=tokenizer_files(tokenizer, config.model.block_size))
    return result, model, tokenizer, data_dir
