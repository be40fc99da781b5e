"""The shared training loop: schedule, optimizer groups, learning, non-finite losses, any module."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from minigpt import GPT
from minigpt.pretrain import FixedWindows, RandomWindows, TokenSplit
from minigpt.train import NonFiniteLossError, TrainConfig, build_optimizer, lr_at, train
from minigpt.train.checkpoint import list_checkpoints
from tests.train.common import quick_train_config, tiny_gpt_config


def _schedule(**kw) -> TrainConfig:
    return TrainConfig(**{"out_dir": "x", "max_steps": 100, "batch_size": 1, "lr": 1.0, "min_lr": 0.1, **kw})


def test_lr_schedule_values_at_the_boundaries():
    c = _schedule(warmup_steps=10, lr_decay_steps=60)
    assert lr_at(0, c) == pytest.approx(0.1)  # (0 + 1) / 10 of the peak: the first update learns
    assert lr_at(9, c) == 1.0 and lr_at(10, c) == 1.0  # end of warm-up, start of the cosine
    assert lr_at(35, c) == pytest.approx(0.55)  # half-way: the mean of lr and min_lr
    assert lr_at(60, c) == pytest.approx(0.1) and lr_at(99, c) == 0.1  # the floor, and after
    no_warmup = _schedule(warmup_steps=0)
    assert lr_at(0, no_warmup) == 1.0 and lr_at(100, no_warmup) == pytest.approx(0.1)
    flat = _schedule(warmup_steps=5, lr_decay_steps=5)
    assert lr_at(4, flat) == 1.0 and lr_at(5, flat) == 0.1


@given(warmup=st.integers(0, 50), extra=st.integers(0, 100), step=st.integers(0, 300))
def test_lr_stays_between_floor_and_peak_and_only_falls_after_warmup(warmup, extra, step):
    c = _schedule(max_steps=300, warmup_steps=warmup, lr_decay_steps=warmup + extra)
    assert 0 < lr_at(step, c) <= 1.0
    if step >= warmup:
        assert c.min_lr <= lr_at(step + 1, c) <= lr_at(step, c)


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 0}, "batch_size=0 must be a positive integer"),
    ({"min_lr": 2.0}, r"min_lr=2.0 must be in \[0, lr=1.0\]"),
    ({"lr_decay_steps": 5, "warmup_steps": 10}, "lr_decay_steps=5 must be an integer >= warmup_steps=10"),
    ({"dtype": "fp8"}, "dtype='fp8' must be one of"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite='ignore' must be 'stop' or 'skip'"),
    ({"backend": "cuda"}, "backend='cuda' must be one of"),
    ({"parallel": "tp"}, "parallel='tp' must be one of"),
])
def test_train_config_names_field_value_and_rule(changes, message):
    with pytest.raises(ValueError, match=message):
        _schedule(**changes)


def test_unknown_train_config_keys_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys \['learning_rate'\]; valid keys are: .*\blr\b"):
        TrainConfig.from_dict({"out_dir": "x", "max_steps": 1, "batch_size": 1, "learning_rate": 1.0})


def test_weight_decay_only_on_trainable_matrices_not_embeddings():
    model = GPT(tiny_gpt_config())
    model.blocks[0].mlp.fc.weight.requires_grad_(False)
    decay, no_decay = build_optimizer(model, _schedule(), torch.device("cpu")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "blocks.0.attn.qkv.weight" in decayed and "blocks.0.mlp.fc.weight" not in decayed
    assert not any("emb" in n or n.endswith("bias") or "ln" in n for n in decayed)
    assert not any(names[id(p)] == "blocks.0.mlp.fc.weight" for p in no_decay["params"])
    with_emb = build_optimizer(model, _schedule(decay_embeddings=True), torch.device("cpu")).param_groups[0]
    assert "tok_emb.weight" in {names[id(p)] for p in with_emb["params"]}


def test_a_few_steps_lower_the_loss_on_shakespeare(tmp_path, shakespeare_chars):
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config())
    train_split, val_split = TokenSplit(shakespeare_chars, "train"), TokenSplit(shakespeare_chars, "val")
    config = quick_train_config(tmp_path, max_steps=40, batch_size=16, lr=1e-2, min_lr=1e-3, warmup_steps=5,
                                eval_interval=40, eval_steps=4, log_interval=10)
    result = train(model, config, RandomWindows(train_split, 32, 16, seed=0),
                   eval_batches=FixedWindows(val_split, 32, 16, steps=4))
    assert result.train_losses[0][1] > 4.0  # about ln(65) = 4.17 at initialisation
    assert result.val_losses[-1][1] < 3.4  # well below ln(65): it learned the character frequencies
    assert (tmp_path / "metrics.jsonl").is_file()


class _PoisonedLoss:
    """The language-model loss, but NaN on the `bad`-th call."""

    def __init__(self, bad: int) -> None:
        self.calls, self.bad = 0, bad

    def __call__(self, model, batch):
        self.calls += 1
        loss = model(batch["idx"], batch["targets"]).loss
        return loss * float("nan") if self.calls == self.bad else loss


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, shakespeare_chars):
    model = GPT(tiny_gpt_config())
    config = quick_train_config(tmp_path, checkpoint_interval=1)
    batches = RandomWindows(TokenSplit(shakespeare_chars, "train"), 32, 4, seed=0)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 .*last checkpoint"):
        train(model, config, batches, loss_fn=_PoisonedLoss(bad=3))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_0000001", "step_0000002"]


def test_nonfinite_loss_can_be_skipped(tmp_path, shakespeare_chars):
    model = GPT(tiny_gpt_config())
    config = quick_train_config(tmp_path, on_nonfinite="skip")
    batches = RandomWindows(TokenSplit(shakespeare_chars, "train"), 32, 4, seed=0)
    result = train(model, config, batches, loss_fn=_PoisonedLoss(bad=3))
    assert result.step == 6 and [s for s, _ in result.train_losses] == [1, 2, 4, 5, 6]
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _Classifier(nn.Module):
    """A frozen GPT body with a trainable head: the shape of a fine-tune."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt = GPT(tiny_gpt_config())
        self.gpt.requires_grad_(False)
        self.head = nn.Linear(32, 2)

    def forward(self, idx):
        hidden, _, _ = self.gpt.hidden(idx)
        return self.head(hidden[:, -1])


class _Labelled:
    """Random token batches labelled by the parity of their last token; seeded and resumable."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def next_batch(self):
        idx = torch.randint(0, 65, (8, 4), generator=self.generator)
        return {"idx": idx, "label": idx[:, -1] % 2}

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def test_loop_trains_any_module_with_its_own_loss_metrics_and_frozen_parameters(tmp_path):
    model = _Classifier()
    frozen = {k: v.clone() for k, v in model.gpt.state_dict().items()}
    fixed = _Labelled().next_batch()

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch["idx"]), batch["label"])

    def accuracy(m):
        with torch.no_grad():
            return {"accuracy": (m(fixed["idx"]).argmax(-1) == fixed["label"]).float().mean().item()}

    def save_head(m, folder):
        torch.save(m.head.state_dict(), folder / "head.pt")

    config = quick_train_config(tmp_path, max_steps=8, lr=1e-2, eval_interval=2, best_metric="accuracy",
                                best_mode="max", early_stopping_patience=2)
    result = train(model, config, _Labelled(), loss_fn=loss_fn, extra_eval=accuracy, save_model=save_head)
    assert all(torch.equal(v, model.gpt.state_dict()[k]) for k, v in frozen.items())
    assert all("accuracy" in e and "val_loss" not in e for e in result.evals)
    assert result.best_metric == max(e["accuracy"] for e in result.evals)
    assert (result.last_checkpoint / "head.pt").is_file()
    assert (result.last_checkpoint / "trainer_model.safetensors").is_file()  # what resuming reads
    if result.stopped_early:  # the last `patience` evaluations did not beat an earlier best
        earlier_best = max(e["accuracy"] for e in result.evals[:-2])
        assert all(e["accuracy"] <= earlier_best for e in result.evals[-2:])


def test_early_stopping_without_evaluations_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="early_stopping_patience needs evaluations"):
        train(GPT(tiny_gpt_config()), quick_train_config(tmp_path, early_stopping_patience=1), _Labelled())


def test_lr_schedule_is_what_the_optimizer_used(tmp_path, shakespeare_chars):
    config = quick_train_config(tmp_path, max_steps=5, warmup_steps=2, lr_decay_steps=4)
    train(GPT(tiny_gpt_config()), config, RandomWindows(TokenSplit(shakespeare_chars, "train"), 32, 2, seed=0))
    import json

    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in logged if r["kind"] == "train"] == [lr_at(s, config) for s in range(5)]
    assert math.isclose(logged[-1]["lr"], config.min_lr)
