"""Pretraining recipes: each a named function that returns a run's starting sections
(model, train, data, sample) as plain dicts, for `--preset NAME` (`RECIPES`).

Any model preset (minigpt.presets.PRESETS) is a recipe too: `gpt2_recipe(preset)`, GPT-2's
training recipe for that model. A config file and overrides go on top
(`minigpt.pretrain.config.load_config`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from minigpt.presets import PRESETS

Recipe = dict[str, dict[str, Any]]


def tiny() -> Recipe:
    """The README's main job: character-level tiny Shakespeare on a 2-core CPU in under 45
    seconds, to a validation loss below 1.60 (issue 31), in well under the time nanoGPT's CPU
    recipe takes to reach 1.89 (benchmarks/results/main_job_vs_nanogpt.md). Tuned by
    measurement, see benchmarks/NOTES.md: Muon gets far lower than AdamW in the same updates
    (1.705 vs 1.923 after 600 at batch 16 x 128); in a fixed time a small model that sees more
    text wins (the `tiny` preset, 2 x 96, 1400 updates of 48 x 64 characters: about four
    passes over the training text). Each update is two micro-batches of 24, one per thread
    (cpu_parallel='micro_batches': the model's operations are too small to split across
    cores), and the evaluation reads 40 x 24 windows, the same 960 as 20 x 48."""
    return {
        "model": {"preset": "tiny"},
        "train": dict(out_dir="runs/tiny", max_steps=1400, batch_size=24, grad_accum=2, cpu_parallel="micro_batches",
                      optimizer="muon", lr=1e-2, min_lr=1e-3,
                      warmup_steps=30, weight_decay=0.1, beta2=0.99, grad_clip=1.0, eval_interval=200,
                      eval_steps=40, log_interval=10, checkpoint_interval=0, device="cpu"),
        "data": {"tokenizer": "char"},
        "sample": {"tokens": 500, "prompt": "\n"},
    }


def tiny_bpe() -> Recipe:
    """The first half of "pretrain, then fine-tune" on a laptop: 4 layers of 128 with the
    tiny preset's attention pattern, GPT-2's BPE vocabulary and a 128-token context (the
    figures below and in first_hour.md were measured at this shape), so its run folder is a base for
    `minigpt finetune` on any text GPT-2's tokenizer reads. With 50,257 tokens the LM head is
    most of the compute (39 of the 45 MFLOPs a trained token costs, `minigpt inspect`), so a
    batch is only 8 x 128 tokens and a few hundred Muon updates take a few CPU minutes; see
    benchmarks/results/first_hour.md for what the pretraining buys a classifier."""
    return {
        "model": {"preset": "tiny", "n_layer": 4, "n_head": 4, "n_embd": 128, "vocab_size": 50257,
                  "block_size": 128, "attention_window": 64},
        "train": {**tiny()["train"], "out_dir": "runs/tiny-bpe", "max_steps": 300, "batch_size": 8, "grad_accum": 1,
                  "cpu_parallel": "ops", "warmup_steps": 20, "eval_interval": 100, "eval_steps": 10},
        "data": {"tokenizer": "gpt2"},
        "sample": {"tokens": 40, "prompt": "The"},
    }


def nanogpt_cpu() -> Recipe:
    """nanoGPT's documented CPU run of shakespeare_char (its README: config/train_shakespeare_char.py
    with --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
    --lr_decay_iters=2000 --dropout=0.0 --eval_iters=20), restated as a minigpt recipe so the
    main job can be compared with it on the same machine (scripts/cpu.py --cases main)."""
    return {
        "model": {"vocab_size": 65, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128,
                  "dropout": 0.0, "bias": False, "qkv_bias": False, "activation": "gelu"},
        "train": dict(out_dir="runs/nanogpt-cpu", max_steps=2000, batch_size=12, lr=1e-3, min_lr=1e-4,
                      warmup_steps=100, weight_decay=0.1, decay_embeddings=True, beta2=0.99, grad_clip=1.0,
                      eval_interval=250, eval_steps=20, log_interval=10, checkpoint_interval=0, device="cpu"),
        "data": {"tokenizer": "char"},
        "sample": {"tokens": 500, "prompt": "\n"},
    }


def gpt2_recipe(preset: str) -> Recipe:
    """Model preset `preset` with a GPT-2-style recipe (nanoGPT's train_gpt2: ~0.5M tokens per
    update at block 1024) on GPT-2's tokenizer."""
    return {
        "model": {"preset": preset},
        "train": dict(out_dir=f"runs/{preset}", max_steps=600_000, batch_size=12, grad_accum=40, lr=6e-4,
                      min_lr=6e-5, warmup_steps=2000, weight_decay=0.1, beta2=0.95, eval_interval=1000,
                      eval_steps=200, checkpoint_interval=1000),
        "data": {"tokenizer": "gpt2"},
    }


RECIPES: dict[str, Callable[[], Recipe]] = {
    "tiny": tiny,
    "tiny-bpe": tiny_bpe,
    "nanogpt-cpu": nanogpt_cpu,
}
"""The tuned recipes by name (`--preset NAME`); a new recipe is a function above, named here."""

DEFAULT_RECIPE = "tiny"
"""What a run starts from when neither --preset nor the config file names a preset."""


def recipe(name: str) -> Recipe:
    """The starting sections of `--preset name`: a tuned recipe, or a model preset with `gpt2_recipe`."""
    if name in RECIPES:
        return RECIPES[name]()
    if name in PRESETS:
        return gpt2_recipe(name)
    raise ValueError(f"unknown preset {name!r}; choose a recipe ({', '.join(RECIPES)}) or a model preset "
                     f"({', '.join(PRESETS)})")
