"""A run folder is owned by one run: no silent reuse, a lock, --overwrite moves aside, safe pruning."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from minigpt import GPT
from minigpt.cli import build_parser, main
from minigpt.pretrain import FixedWindows, RandomWindows, TokenSplit
from minigpt.train import checkpoint as ckpt
from minigpt.train import train
from minigpt.train.observe import read_metrics
from minigpt.train.runfolder import LOCK_FILE, RunFolderError
from tests.train.common import quick_train_config, tiny_gpt_config


def _run(out_dir, data, resume=False, overwrite=False, loss_fn=None, **overrides):
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config())
    kwargs = {"loss_fn": loss_fn} if loss_fn is not None else {}
    return train(model, quick_train_config(out_dir, **overrides), RandomWindows(TokenSplit(data, "train"), 32, 4, seed=7),
                 eval_batches=FixedWindows(TokenSplit(data, "val"), 32, 4, steps=2), resume=resume,
                 overwrite=overwrite, run_metadata={"model": model.config.to_dict()}, **kwargs)


def _write_lock(folder, pid):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))


def test_rerun_into_finished_run_folder_is_refused(tmp_path, shakespeare_chars):
    _run(tmp_path, shakespeare_chars, max_steps=3)
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(RunFolderError, match=rf"{tmp_path} already holds a run .*--resume.*--overwrite"):
        _run(tmp_path, shakespeare_chars, max_steps=3)
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics  # not truncated
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_0000003"]
    assert not (tmp_path / LOCK_FILE).exists()


def test_rerun_from_the_cli_is_a_one_line_error(tmp_path, shakespeare_chars):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({
        "model": {"vocab_size": 65, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 16,
                  "attention_pattern": ["dense"]},  # the file starts from tiny's dense/banded model
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2, "eval_interval": 1,
                  "eval_steps": 1, "device": "cpu", "progress": False},
        "data": {"path": str(shakespeare_chars)}, "sample": {"tokens": 0}}))
    main(["train", "--config", str(config)])
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(config)])
    message = str(exit_.value.code)
    assert message.startswith("minigpt train: error: ") and "--resume" in message and "--overwrite" in message
    assert "\n" not in message
    main(["train", "--config", str(config), "--overwrite"])  # and the way out works
    assert len(list(tmp_path.glob("run.old-*"))) == 1


def test_finetune_commands_take_overwrite():
    parser = build_parser()
    for task in ("classify", "completion"):
        args = parser.parse_args(["finetune", task, "--init", "m", "--train-file", "f", "--out", "o", "--overwrite"])
        assert args.overwrite and not args.resume


def test_overwrite_moves_old_run_aside(tmp_path, shakespeare_chars, caplog):
    run = tmp_path / "run"
    _run(run, shakespeare_chars, max_steps=3)
    old_metrics = (run / "metrics.jsonl").read_text()
    with caplog.at_level(logging.WARNING):
        result = _run(run, shakespeare_chars, overwrite=True, max_steps=6)
    (aside,) = tmp_path.glob("run.old-*")
    assert str(aside) in caplog.text  # says where
    assert (aside / "metrics.jsonl").read_text() == old_metrics  # moved whole, not deleted
    assert [p.name for p in ckpt.list_checkpoints(aside / "checkpoints")] == ["step_0000003"]
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_0000003", "step_0000006"]
    assert result.step == 6 and not (aside / LOCK_FILE).exists() and not (run / LOCK_FILE).exists()
    with pytest.raises(RunFolderError, match="choose one"):
        _run(run, shakespeare_chars, resume=True, overwrite=True)


def test_second_concurrent_run_is_refused_by_lock(tmp_path, shakespeare_chars):
    _write_lock(tmp_path, os.getppid())  # a live process on this host holds the folder
    with pytest.raises(RunFolderError, match=rf"{tmp_path} is in use by another run \(pid {os.getppid()} on "):
        _run(tmp_path, shakespeare_chars, max_steps=3)
    with pytest.raises(RunFolderError, match="in use by another run"):
        _run(tmp_path, shakespeare_chars, resume=True, max_steps=3)
    assert not (tmp_path / "checkpoints").exists()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getppid()  # not taken


def test_lock_is_held_during_the_run_and_released_after_an_error(tmp_path, shakespeare_chars):
    seen = []

    def loss_fn(model, batch):
        seen.append(json.loads((tmp_path / LOCK_FILE).read_text())["pid"])
        if len(seen) == 2:
            raise RuntimeError("boom")
        return model(batch["idx"], batch["targets"]).loss

    with pytest.raises(RuntimeError, match="boom"):
        _run(tmp_path, shakespeare_chars, loss_fn=loss_fn)
    assert seen == [os.getpid()] * 2
    assert not (tmp_path / LOCK_FILE).exists()


def test_stale_lock_is_taken_over(tmp_path, shakespeare_chars, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is now free: the run that held the lock was killed
    _write_lock(tmp_path, dead.pid)
    with caplog.at_level(logging.WARNING):
        result = _run(tmp_path, shakespeare_chars, resume=True, max_steps=3)
    assert result.step == 3
    assert f"{tmp_path / LOCK_FILE} was left by a run that is no longer alive (pid {dead.pid}" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_prune_never_leaves_half_checkpoint(tmp_path, shakespeare_chars, monkeypatch):
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes one file, then the process "dies"
        files = sorted(p.path for p in os.scandir(path) if p.is_file()) if os.path.isdir(path) else []
        if not files:
            return real_rmtree(path, *args, **kwargs)
        os.unlink(files[0])
        raise KeyboardInterrupt("killed while pruning")

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, shakespeare_chars, max_steps=6, checkpoint_interval=1, keep_last=1, eval_interval=100)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    root = tmp_path / "checkpoints"
    for folder in ckpt.list_checkpoints(root):  # every folder a resume could pick is whole
        ckpt.read_trainer_info(folder), ckpt.read_trainer_state(folder)
        GPT.from_pretrained(folder)
    assert any(p.name.startswith(".trash-step_") for p in root.iterdir())  # the interrupted delete, hidden
    result = _run(tmp_path, shakespeare_chars, resume=True, max_steps=6, checkpoint_interval=1, keep_last=1,
                  eval_interval=100)
    assert result.step == 6 and not any(p.name.startswith(".") for p in root.iterdir())


def test_kill_9_leaves_a_stale_lock_that_resume_takes_over_and_continues_exactly(tmp_path, shakespeare_chars,
                                                                                   caplog):
    def config(name):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({
            "model": {"vocab_size": 65, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32, "dropout": 0.1,
                      "attention_pattern": ["dense"]},  # the file starts from tiny's dense/banded model
            "train": {"out_dir": str(tmp_path / name), "max_steps": 120, "batch_size": 4, "eval_interval": 50,
                      "eval_steps": 1, "log_interval": 1, "checkpoint_interval": 7, "device": "cpu",
                      "progress": False, "cpu_threads": 1},
            "data": {"path": str(shakespeare_chars)}, "sample": {"tokens": 0}}))
        return str(path)

    main(["train", "--config", config("whole")])
    killed = subprocess.Popen([sys.executable, "-m", "minigpt", "train", "--config", config("killed")],
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    while killed.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= 20):
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert json.loads((tmp_path / "killed" / LOCK_FILE).read_text())["pid"] == killed.pid  # left behind

    with caplog.at_level(logging.WARNING):
        main(["train", "--config", config("killed"), "--resume"])
    assert f"(pid {killed.pid} on {socket.gethostname()}); taking it over" in caplog.text
    assert not (tmp_path / "killed" / LOCK_FILE).exists()
    assert _train_losses(tmp_path / "killed") == _train_losses(tmp_path / "whole")  # bit for bit
    latest = [ckpt.load_state_dict_file(tmp_path / run / "checkpoints" / "latest" / ckpt.MODEL_FILE)
              for run in ("whole", "killed")]
    for name in latest[0]:
        assert torch.equal(latest[0][name], latest[1][name]), name


def _train_losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run) if r["kind"] == "train"]


def test_finetune_rerun_is_refused_and_overwrite_moves_it_aside(tmp_path, monkeypatch):
    from minigpt import GPTConfig, Tokenizer
    from minigpt.finetune.config import FinetuneConfig, default_train_config
    from minigpt.finetune.run import finetune
    from tests.helpers import use_tiktoken_cache

    use_tiktoken_cache(monkeypatch)
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"row {i} is {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}\n"
                                             for i in range(20)))
    config = FinetuneConfig(task="classify", train_file=str(data), max_length=8)
    train_config = default_train_config(config, str(tmp_path / "run"), dict(
        max_steps=2, batch_size=4, eval_interval=2, eval_steps=1, device="cpu", progress=False))

    def run(**kwargs):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=50257, block_size=8, n_layer=1, n_head=2, n_embd=16))
        return finetune(config, train_config, model=model, tokenizer=Tokenizer(), **kwargs)

    run()
    with pytest.raises(RunFolderError, match="already holds a run"):
        run()
    run(overwrite=True)
    (aside,) = tmp_path.glob("run.old-*")
    assert (aside / "model" / "config.json").is_file() and (tmp_path / "run" / "model" / "config.json").is_file()
