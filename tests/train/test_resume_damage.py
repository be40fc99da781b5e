"""Resume survives a damaged checkpoint or metrics log, and refuses untrusted trainer state."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from minigpt import GPT
from minigpt.pretrain import FixedWindows, RandomWindows, TokenSplit
from minigpt.train import NonFiniteLossError, train
from minigpt.train import checkpoint as ckpt
from minigpt.train.observe import read_metrics
from tests.train.common import quick_train_config, tiny_gpt_config

STEPS = dict(max_steps=9, lr_decay_steps=9, checkpoint_interval=3, keep_last=3, eval_interval=3)


def _run(out_dir, data, resume=False, loss_fn=None, **overrides):
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config(dropout=0.1))
    kwargs = {"loss_fn": loss_fn} if loss_fn is not None else {}
    result = train(model, quick_train_config(out_dir, **{**STEPS, **overrides}),
                   RandomWindows(TokenSplit(data, "train"), 32, 4, seed=7),
                   eval_batches=FixedWindows(TokenSplit(data, "val"), 32, 4, steps=2), resume=resume,
                   run_metadata={"model": model.config.to_dict()}, **kwargs)
    return model, result


def _truncate(path, keep=None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


DAMAGE = {
    "zero-byte model.safetensors": ("model.safetensors", lambda p: _truncate(p, 0)),
    "truncated model.safetensors": ("model.safetensors", _truncate),
    "empty trainer.json": ("trainer.json", lambda p: _truncate(p, 0)),
    "bad trainer.json": ("trainer.json", _truncate),
    "truncated trainer.pt": ("trainer.pt", _truncate),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_skips_truncated_newest_checkpoint(tmp_path, shakespeare_chars, caplog, damage):
    whole, expected = _run(tmp_path / "a", shakespeare_chars)
    _run(tmp_path / "b", shakespeare_chars, max_steps=6)  # "interrupted" after step 6
    name, spoil = DAMAGE[damage]
    spoil(tmp_path / "b" / "checkpoints" / "step_0000006" / name)
    with caplog.at_level(logging.WARNING):
        resumed, result = _run(tmp_path / "b", shakespeare_chars, resume=True)
    assert f"cannot resume from {tmp_path / 'b' / 'checkpoints' / 'step_0000006'}: " in caplog.text
    assert str(tmp_path / "b" / "checkpoints" / "step_0000006" / name) in caplog.text  # names the file
    assert result.train_losses == expected.train_losses  # step 3 is an exact state: same run, bit for bit
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    steps = [r["step"] for r in read_metrics(tmp_path / "b") if r["kind"] == "train"]
    assert steps == list(range(1, 10))  # the log reads as one run


def test_resume_with_no_loadable_checkpoint_lists_what_was_tried(tmp_path, shakespeare_chars):
    _run(tmp_path, shakespeare_chars, max_steps=6)
    root = tmp_path / "checkpoints"
    _truncate(root / "step_0000006" / "model.safetensors", 0)
    (root / "step_0000003" / "trainer.json").write_text("")
    with pytest.raises(ValueError) as err:
        _run(tmp_path, shakespeare_chars, resume=True)
    message = str(err.value)
    assert message.startswith(f"cannot resume from {root}: none of its 2 checkpoints loads")
    assert (f"step_0000006: weights file {root / 'step_0000006' / 'model.safetensors'} is damaged or incomplete "
            f"(it is empty: 0 bytes)") in message
    assert f"step_0000003: trainer info {root / 'step_0000003' / 'trainer.json'} is empty" in message
    assert "--overwrite" in message and "\n" not in message


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_malicious_trainer_state_is_refused_in_one_line(tmp_path, shakespeare_chars):
    _run(tmp_path, shakespeare_chars, max_steps=3)
    marker = tmp_path / "pwned"
    torch.save({"step": 3, "loop": _Payload(str(marker))}, tmp_path / "checkpoints" / "step_0000003" / "trainer.pt")
    with pytest.raises(ValueError) as err:
        _run(tmp_path, shakespeare_chars, resume=True)
    message = str(err.value)
    assert "trainer.pt holds Python objects other than tensors and plain containers; refused for safety" in message
    assert "weights_only" not in message and "\n" not in message
    assert not marker.exists()  # the payload never ran


def test_cut_metrics_line_is_dropped_on_resume(tmp_path, shakespeare_chars, caplog):
    _run(tmp_path, shakespeare_chars, max_steps=3)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 4, "lo')  # the crash cut this line
    with caplog.at_level(logging.WARNING):
        _, result = _run(tmp_path, shakespeare_chars, resume=True, max_steps=6)
    assert f"{tmp_path / 'metrics.jsonl'}: dropping its last line, cut short" in caplog.text
    assert result.step == 6
    assert [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "train"] == list(range(1, 7))


def test_bad_metrics_line_before_the_last_names_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\nnot json\n{"kind": "train", "step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a metrics record .* delete that line"):
        read_metrics(tmp_path)


def test_nonfinite_skip_is_bounded(tmp_path, shakespeare_chars):
    def nan_loss(model, batch):
        return model(batch["idx"], batch["targets"]).loss * float("nan")

    with pytest.raises(NonFiniteLossError, match=r"3 updates in a row \(steps 1 to 3\) .* raise max_consecutive_skips"):
        _run(tmp_path, shakespeare_chars, loss_fn=nan_loss, on_nonfinite="skip", max_consecutive_skips=3,
             max_steps=50)
    assert ckpt.list_checkpoints(tmp_path / "checkpoints") == []  # stopped without saving


def test_nonfinite_skip_counts_only_consecutive_updates(tmp_path, shakespeare_chars):
    calls = []

    def every_other_nan(model, batch):
        calls.append(1)
        loss = model(batch["idx"], batch["targets"]).loss
        return loss * float("nan") if len(calls) % 2 else loss

    _, result = _run(tmp_path, shakespeare_chars, loss_fn=every_other_nan, on_nonfinite="skip",
                     max_consecutive_skips=2, max_steps=6, eval_interval=100)
    assert result.step == 6 and len(result.train_losses) == 3
    assert json.loads((tmp_path / "checkpoints" / "step_0000006" / "trainer.json").read_text())["step"] == 6


def test_resume_reports_damaged_files_with_the_shared_readers_messages(tmp_path, shakespeare_chars):
    """A damaged checkpoint file reads the same on resume as anywhere else (weights via
    `load_safetensors`, JSON via `files.read_json`), so one message teaches one fix."""
    from minigpt.files import BadFileError, DamagedWeightsError, load_safetensors, read_json

    _run(tmp_path, shakespeare_chars, max_steps=3)
    folder = tmp_path / "checkpoints" / "step_0000003"
    _truncate(folder / "model.safetensors")
    _truncate(folder / "trainer.json")
    with pytest.raises(DamagedWeightsError) as shared:
        load_safetensors(folder / "model.safetensors")
    with pytest.raises(DamagedWeightsError) as ours:
        ckpt.load_state_dict_file(folder / "model.safetensors")
    assert str(ours.value) == str(shared.value)
    with pytest.raises(BadFileError) as shared:
        read_json(folder / "trainer.json", "trainer info")
    with pytest.raises(BadFileError) as ours:
        ckpt.read_trainer_info(folder)
    assert str(ours.value) == str(shared.value) and "is not valid JSON" in str(ours.value)
