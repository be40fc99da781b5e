"""Builders shared by the training tests."""
from __future__ import annotations

from minigpt import GPTConfig
from minigpt.train import TrainConfig


def tiny_gpt_config(**overrides) -> GPTConfig:
    """A GPT small enough that a training step takes milliseconds (dense and banded layers)."""
    values = dict(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32,
                  attention_pattern=("dense", "banded"), attention_window=8)
    return GPTConfig(**{**values, **overrides})


def quick_train_config(out_dir, **overrides) -> TrainConfig:
    values = dict(out_dir=str(out_dir), max_steps=6, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=2,
                  eval_interval=3, eval_steps=2, log_interval=1, checkpoint_interval=3, device="cpu", progress=False)
    return TrainConfig(**{**values, **overrides})


def train_as_pretrain_from_init_by_name(config_file) -> None:
    """One process trained on `config_file` (a `minigpt train --config` file) with the loaders,
    recipe and evaluations `pretrain` uses, but from `init_by_name` weights: the start every
    mesh run has (`minigpt.train.materialize`), so that its losses are the reference for them."""
    from minigpt import GPT
    from minigpt.pretrain import FixedWindows, RandomWindows, TokenSplit
    from minigpt.pretrain.config import load_config
    from minigpt.train import train
    from minigpt.train.materialize import init_by_name

    config = load_config(file=config_file)
    tc, block = config.train, config.model.block_size
    data = config.data.path
    batches = RandomWindows(TokenSplit(data, "train"), block, tc.batch_size, seed=tc.seed)
    evals = FixedWindows(TokenSplit(data, "val"), block, tc.batch_size, tc.eval_steps, seed=config.data.eval_seed)
    model = GPT(config.model)
    init_by_name(model, tc.seed)
    train(model, tc, batches, eval_batches=evals)
