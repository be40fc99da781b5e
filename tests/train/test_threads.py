"""cpu_parallel='micro_batches' (minigpt.train.threads): an update's micro-batches on
concurrent CPU threads give, bit for bit, the losses, evaluations and weights that one
thread computing them in turn gives (the gradients are added in micro-batch order), for
pretraining and a prompt-masked fine-tuning loss, AdamW and Muon, and a group of threads
that does not divide grad_accum; where it cannot be used it says why and runs in turn."""
from __future__ import annotations

import threading

import pytest
import torch

from minigpt import GPT
from minigpt.finetune.tasks import masked_lm_loss
from minigpt.train import train
from minigpt.train.loop import language_model_loss
from tests.train.common import quick_train_config, tiny_gpt_config
from tests.train.test_loss_weighting import SplitBatches


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """cpu_threads sets torch's thread count for the process; put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class ThreadsSeen:
    """A loss that records which threads computed it, and how many threads torch gave each."""

    def __init__(self, loss_fn):
        self.loss_fn, self.names, self.torch_threads = loss_fn, set(), set()

    def __call__(self, model, batch):
        self.names.add(threading.current_thread().name)
        self.torch_threads.add(torch.get_num_threads())
        return self.loss_fn(model, batch)


def run(out_dir, cpu_parallel: str, threads: int, grad_accum: int, masked: bool, optimizer: str, dropout=0.0,
        loss: ThreadsSeen | None = None, **train_config):
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config(n_embd=16, block_size=16, dropout=dropout))
    loss = loss or ThreadsSeen(masked_lm_loss if masked else language_model_loss)
    config = quick_train_config(out_dir, max_steps=4, batch_size=2, grad_accum=grad_accum, optimizer=optimizer,
                                cpu_parallel=cpu_parallel, cpu_threads=threads, eval_interval=2, checkpoint_interval=0,
                                **train_config)
    result = train(model, config, SplitBatches(masked, 2), eval_batches=lambda: [SplitBatches(masked, 2).next_batch()
                                                                                  for _ in range(3)], loss_fn=loss)
    return result, model.state_dict(), loss.names


@pytest.mark.parametrize("grad_accum", [4, 3], ids=["4 micro-batches", "3 micro-batches"])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("masked", [False, True], ids=["pretraining", "masked"])
def test_micro_batches_on_threads_equal_one_thread_bit_for_bit(tmp_path, grad_accum, optimizer, masked):
    want, want_weights, want_threads = run(tmp_path / "ops", "ops", 1, grad_accum, masked, optimizer)
    got, got_weights, got_threads = run(tmp_path / "threads", "micro_batches", 2, grad_accum, masked, optimizer)
    assert want_threads == {"MainThread"}
    assert len([name for name in got_threads if name.startswith("micro-batch")]) == 2, got_threads
    assert torch.get_num_threads() == 2  # given back after the run
    assert got.train_losses == want.train_losses
    assert got.evals == want.evals
    for name, value in want_weights.items():
        assert torch.equal(got_weights[name], value), name


def test_one_thread_runs_the_micro_batches_in_turn(tmp_path):
    _, _, names = run(tmp_path, "micro_batches", 1, 2, False, "adamw")
    assert names == {"MainThread"}


def test_torch_threads_are_restored_after_the_run(tmp_path):
    torch.set_num_threads(2)
    run(tmp_path, "micro_batches", 0, 2, False, "adamw")
    assert torch.get_num_threads() == 2


def test_each_thread_runs_torch_on_one_thread(tmp_path):
    loss = ThreadsSeen(language_model_loss)
    run(tmp_path, "micro_batches", 2, 2, False, "adamw", loss=loss)
    assert loss.torch_threads == {1}


@pytest.mark.parametrize("case", ["dropout", "float16", "compile"])
def test_where_threads_cannot_be_used_the_micro_batches_run_in_turn_and_it_says_why(tmp_path, caplog, case):
    if case == "compile":  # compiling takes long: the pool's own decision is enough here
        from minigpt.train.threads import micro_batch_threads

        with caplog.at_level("WARNING", logger="minigpt.train.threads"), micro_batch_threads(
                "micro_batches", 2, torch.device("cpu"), "none", torch.nn.Linear(2, 2), compiled=True) as threads:
            assert threads is None
        assert "torch.compile is not thread-safe" in caplog.text
        return
    with caplog.at_level("WARNING", logger="minigpt.train.threads"):
        if case == "dropout":
            _, _, names = run(tmp_path, "micro_batches", 2, 2, False, "adamw", dropout=0.1)
        else:
            _, _, names = run(tmp_path, "micro_batches", 2, 2, False, "adamw", dtype="float16")
    assert names == {"MainThread"}
    want = {"dropout": "the model has dropout (", "float16": "float16's GradScaler"}[case]
    assert f"cpu_parallel='micro_batches' is not used: {want}" in caplog.text


def test_a_failing_micro_batch_raises_and_gives_the_threads_back(tmp_path):
    def failing(model, batch):
        if threading.current_thread().name != "MainThread":
            raise RuntimeError("the loss failed on a thread")
        return language_model_loss(model, batch)

    torch.set_num_threads(2)
    with pytest.raises(RuntimeError, match="the loss failed on a thread"):
        run(tmp_path, "micro_batches", 2, 2, False, "adamw", loss=ThreadsSeen(failing))
    assert torch.get_num_threads() == 2


def test_an_unknown_cpu_parallel_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"cpu_parallel='threads' must be one of \('ops', 'micro_batches'\)"):
        quick_train_config(tmp_path, cpu_parallel="threads")
