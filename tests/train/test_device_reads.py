"""The loop reads the device only at read points (log, eval, checkpoint and last steps), except
under on_nonfinite='skip', which reads every update; deferred reads give the same numbers."""
from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import minigpt.finetune
import minigpt.train
from minigpt import GPT
from minigpt.train import NonFiniteLossError, lr_at, train
from minigpt.train.checkpoint import list_checkpoints
from minigpt.train.observe import read_metrics
from tests.train.common import quick_train_config, tiny_gpt_config

TRAIN_PACKAGE = Path(minigpt.train.__file__).parent
FINETUNE_PACKAGE = Path(minigpt.finetune.__file__).parent
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
"""Tensor methods that copy a value to the host: on a GPU, each one waits for the device."""


class _Batches:
    """Resumable random token batches, the same for every run (batch i from seed i)."""

    def __init__(self) -> None:
        self.i = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        tokens = torch.randint(0, 65, (4, 33), generator=torch.Generator().manual_seed(self.i))
        self.i += 1
        return {"idx": tokens[:, :-1], "targets": tokens[:, 1:]}

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


class _NanAtUpdate:
    """The language-model loss, but NaN on the `bad`-th call (grad_accum=1: the `bad`-th update)."""

    def __init__(self, bad: int | None = None) -> None:
        self.calls, self.bad = 0, bad

    def __call__(self, model, batch):
        self.calls += 1
        loss = model(batch["idx"], batch["targets"]).loss
        return loss * float("nan") if self.calls == self.bad else loss


def _train(out_dir, loss_fn=None, **overrides):
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config())
    config = quick_train_config(out_dir, **{"max_steps": 10, "log_interval": 5, "checkpoint_interval": 0,
                                            **overrides})
    result = train(model, config, _Batches(), loss_fn=loss_fn or _NanAtUpdate())
    return model, result


def count_host_reads(monkeypatch, counted: Callable[[Path], bool]) -> Counter[str]:
    """Counts host reads (`HOST_READS`, and boolean-mask indexing, whose output size is
    device data) of tensors by code in the files `counted` accepts, from now on."""
    counts: Counter[str] = Counter()

    def counting(name, only=lambda args: True):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = Path(sys._getframe(1).f_code.co_filename)
            if counted(caller) and only(args):
                counts[f"{caller.name}: {name}"] += 1
            return original(self, *args, **kwargs)
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(torch.Tensor, "__getitem__", counting("__getitem__", _indexes_by_mask))
    return counts


def _indexes_by_mask(args: tuple) -> bool:
    index = args[0]
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in (index if isinstance(index, tuple) else (index,)))


@pytest.fixture
def host_reads(monkeypatch):
    """Counts host reads of tensors made by code in minigpt/train/, outside checkpoint.py (saving
    a checkpoint reads the weights, and checkpoint steps are read points by design)."""
    return count_host_reads(monkeypatch, lambda f: f.parent == TRAIN_PACKAGE and f.name != "checkpoint.py")


@pytest.mark.parametrize("on_nonfinite, reads", [("stop", 2), ("skip", 10)])
def test_ten_updates_read_the_device_once_per_log_step_or_once_per_update_when_skipping(
        tmp_path, host_reads, on_nonfinite, reads):
    _, result = _train(tmp_path, on_nonfinite=on_nonfinite)
    assert result.step == 10
    assert sum(host_reads.values()) == reads, dict(host_reads)


def test_deferred_reads_give_the_numbers_of_reading_every_update(tmp_path):
    every_model, every = _train(tmp_path / "every", log_interval=1)
    deferred_model, deferred = _train(tmp_path / "deferred")
    skip_model, skip = _train(tmp_path / "skip", on_nonfinite="skip")  # reads before each step
    assert [s for s, _ in deferred.train_losses] == list(range(1, 11))
    assert deferred.train_losses == every.train_losses == skip.train_losses
    for (name, a), b, c in zip(every_model.state_dict().items(), deferred_model.state_dict().values(),
                               skip_model.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c), name
    logged = {r["step"]: r for r in read_metrics(tmp_path / "deferred") if r["kind"] == "train"}
    assert sorted(logged) == [5, 10]
    losses = dict(deferred.train_losses)
    assert logged[5]["loss"] == pytest.approx(sum(losses[s] for s in range(1, 6)) / 5, rel=1e-12)
    assert logged[10]["loss"] == pytest.approx(sum(losses[s] for s in range(6, 11)) / 5, rel=1e-12)


def test_nan_with_stop_raises_at_the_next_read_point_naming_the_first_bad_update(tmp_path):
    loss_fn = _NanAtUpdate(bad=3)
    config = quick_train_config(tmp_path, max_steps=10)
    with pytest.raises(NonFiniteLossError) as raised:
        _train(tmp_path, loss_fn=loss_fn, checkpoint_interval=2)
    assert str(raised.value).startswith(f"loss is nan at step 3 (lr {lr_at(2, config):.3g}); stopped without saving")
    assert loss_fn.calls == 4  # found at step 4, the next read point (a checkpoint step), before saving it
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_0000002"]


def test_nan_with_stop_between_log_steps_saves_and_logs_nothing_after_it(tmp_path):
    loss_fn = _NanAtUpdate(bad=3)
    with pytest.raises(NonFiniteLossError, match=r"^loss is nan at step 3 "):
        _train(tmp_path, loss_fn=loss_fn)
    assert loss_fn.calls == 5  # updates 4 and 5 ran (on NaN weights) before the read at log step 5
    assert list_checkpoints(tmp_path / "checkpoints") == []
    # A fresh run that fails before its first checkpoint sets its files aside (runfolder).
    (aside,) = tmp_path.glob("failed-*")
    assert [r for r in read_metrics(aside) if r["kind"] == "train"] == []


def test_nan_with_skip_skips_exactly_that_update(tmp_path):
    model, result = _train(tmp_path, loss_fn=_NanAtUpdate(bad=3), on_nonfinite="skip")
    _, clean = _train(tmp_path / "clean")
    assert [s for s, _ in result.train_losses] == [1, 2, *range(4, 11)]
    assert result.train_losses[:2] == clean.train_losses[:2]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    logged = {r["step"]: r["skipped"] for r in read_metrics(tmp_path) if r["kind"] == "train"}
    assert logged == {5: 1, 10: 1}
    trainer = torch.load(tmp_path / "checkpoints" / "step_0000010" / "trainer.pt", weights_only=True)
    adam_steps = {float(s["step"]) for s in trainer["optimizer"]["state"].values()}
    assert adam_steps == {9.0}  # AdamW applied 9 of the 10 updates


class _WordTokenizer:
    """Words to ids (1 + position in a fixed list); eos is 0."""

    eos_id = 0
    words = "good bad fine awful film plot is was ok".split()

    def encode(self, text):
        return [1 + self.words.index(w) for w in text.split()]


@pytest.mark.parametrize("task, rows", [
    ("classify", "text,label\n" + "".join(f"{t},{y}\n" for t, y in [
        ("good film", "pos"), ("bad plot", "neg"), ("film was fine", "pos"), ("awful", "neg"),
        ("plot is good", "pos"), ("was bad", "neg"), ("ok film", "pos"), ("awful plot is bad", "neg")])),
    ("completion", "prompt,completion\n" + "".join(f"{p},{c}\n" for p, c in [
        ("good film", " is ok"), ("bad plot", " was awful"), ("film", " was fine"),
        ("awful plot", " is bad"), ("plot was", " good"), ("ok", " film is ok"), ("fine", " plot"),
        ("bad", " film was bad")])),
], ids=["classify", "completion"])
def test_ten_finetuning_updates_read_the_device_once_per_log_step(tmp_path, monkeypatch, task, rows):
    """The fine-tuning losses (classifier head, LM head at target positions only) add no
    read of their own: lengths and target positions come from the loader's CPU batch."""
    from minigpt.finetune.config import FinetuneConfig, default_train_config
    from minigpt.finetune.run import prepare

    (tmp_path / "rows.csv").write_text(rows)
    config = FinetuneConfig(task=task, train_file=str(tmp_path / "rows.csv"), val_fraction=0.25)
    train_config = default_train_config(config, str(tmp_path / "run"), dict(
        max_steps=10, batch_size=3, log_interval=5, checkpoint_interval=0, device="cpu",
        progress=False))
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config(vocab_size=len(_WordTokenizer.words) + 1, block_size=8))
    run, _ = prepare(config, train_config, model=model, tokenizer=_WordTokenizer())
    # The loader (data.py) builds batches on the CPU by design; they reach the device after it.
    reads = count_host_reads(monkeypatch, lambda f: f.parent in (TRAIN_PACKAGE, FINETUNE_PACKAGE)
                             and f.name not in ("checkpoint.py", "data.py"))
    result = train(run.model, train_config, run.train_batches, loss_fn=run.loss_fn)
    assert result.step == 10
    assert sum(reads.values()) == 2, dict(reads)


def test_collated_batches_carry_what_the_losses_would_read_from_the_device():
    """target_positions are the flat row-major positions of the boolean target mask; a
    classification row with no tokens is refused where the batch is built."""
    from minigpt.finetune.data import (IGNORE_INDEX, ClassificationExample, CompletionExample,
                                       collate_classification, collate_completion)

    rows = [CompletionExample((1, 2, 3, 4), (False, False, True, True)), CompletionExample((5, 6), (False, True))]
    batch = collate_completion(rows)
    assert batch["target_positions"].tolist() == [1, 2, 3]
    assert torch.equal(batch["targets"].flatten()[batch["target_positions"]],
                       batch["targets"][batch["targets"] != IGNORE_INDEX])
    with pytest.raises(ValueError, match="example 1 of the batch has no tokens"):
        collate_classification([ClassificationExample((5,), 0), ClassificationExample((), 1)])
