"""Checkpoints: exact resumption, atomic writes under a crash, retention, and mismatches."""
from __future__ import annotations

import pytest
import torch

from minigpt import GPT
from minigpt.pretrain import FixedWindows, RandomWindows, TokenSplit
from minigpt.train import checkpoint as ckpt
from minigpt.train import train
from tests.train.common import quick_train_config, tiny_gpt_config


def _run(out_dir, data, resume=False, model_config=None, **overrides):
    torch.manual_seed(0)
    model = GPT(model_config or tiny_gpt_config(dropout=0.1))  # dropout: the RNG state must resume too
    config = quick_train_config(out_dir, **overrides)
    result = train(model, config, RandomWindows(TokenSplit(data, "train"), 32, 4, seed=7),
                   eval_batches=FixedWindows(TokenSplit(data, "val"), 32, 4, steps=2),
                   resume=resume, run_metadata={"model": model.config.to_dict()})
    return model, result


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resumed_run_equals_uninterrupted_run_exactly(tmp_path, shakespeare_chars, optimizer):
    whole, expected = _run(tmp_path / "a", shakespeare_chars, max_steps=8, lr_decay_steps=8, optimizer=optimizer)
    _run(tmp_path / "b", shakespeare_chars, max_steps=4, lr_decay_steps=8, optimizer=optimizer)  # "interrupted"
    resumed, result = _run(tmp_path / "b", shakespeare_chars, resume=True, max_steps=8, lr_decay_steps=8,
                           optimizer=optimizer)
    assert result.train_losses == expected.train_losses  # bit for bit, every step
    resumed_evals = {e["step"]: e["val_loss"] for e in result.evals}  # plus the one that ended the first part
    assert all(resumed_evals[e["step"]] == e["val_loss"] for e in expected.evals)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_crash_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path, shakespeare_chars, monkeypatch):
    _run(tmp_path, shakespeare_chars, max_steps=3, lr_decay_steps=6)
    real_save = torch.save

    def crash(obj, path, *args, **kwargs):  # the trainer state is half written when the "power fails"
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, shakespeare_chars, resume=True, max_steps=6, lr_decay_steps=6)
    monkeypatch.setattr(torch, "save", real_save)
    root = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_0000003"]
    assert any(p.name.startswith(".tmp-step_0000006") for p in root.iterdir())  # the torn write, ignored
    assert GPT.from_pretrained(root / "latest").config == tiny_gpt_config(dropout=0.1)
    _, result = _run(tmp_path, shakespeare_chars, resume=True, max_steps=6, lr_decay_steps=6)
    assert result.step == 6 and not any(p.name.startswith(".tmp-") for p in root.iterdir())


def test_keeps_the_last_k_and_the_best(tmp_path, shakespeare_chars):
    _, result = _run(tmp_path, shakespeare_chars, max_steps=8, checkpoint_interval=1, keep_last=2, eval_interval=2)
    root = tmp_path / "checkpoints"
    kept = [p.name for p in ckpt.list_checkpoints(root)]
    best = ckpt.best_checkpoint(root)
    assert kept[-2:] == ["step_0000007", "step_0000008"] and best.name in kept
    assert len(kept) == (2 if best.name in kept[-2:] else 3)
    assert best.name == f"step_{result.best_step:07d}"
    assert (root / "best").resolve() == best.resolve()


def test_checkpoint_folder_is_a_model_folder(tmp_path, shakespeare_chars):
    model, result = _run(tmp_path, shakespeare_chars, max_steps=3)
    loaded = GPT.from_pretrained(result.last_checkpoint)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_resuming_with_a_different_config_says_what_differs(tmp_path, shakespeare_chars):
    _run(tmp_path, shakespeare_chars, max_steps=3)
    with pytest.raises(ValueError, match=r"train\.lr: checkpoint 0\.001, now 0\.002"):
        _run(tmp_path, shakespeare_chars, resume=True, max_steps=6, lr=2e-3)
    with pytest.raises(ValueError, match=r"model\.n_embd: checkpoint 32, now 64"):
        _run(tmp_path, shakespeare_chars, resume=True, max_steps=6, model_config=tiny_gpt_config(n_embd=64))


def test_checkpoints_from_before_a_new_config_field_still_resume(tmp_path, shakespeare_chars):
    import json

    _run(tmp_path, shakespeare_chars, max_steps=3)
    for info_file in (tmp_path / "checkpoints").glob("step_*/trainer.json"):
        info = json.loads(info_file.read_text())
        del info["train_config"]["optimizer"]  # as written before these fields existed
        del info["run_metadata"]["model"]["activation"]
        info_file.write_text(json.dumps(info))
    _run(tmp_path, shakespeare_chars, resume=True, max_steps=6)  # defaults: the same run
    with pytest.raises(ValueError, match=r"train\.optimizer: checkpoint 'adamw', now 'muon'"):
        _run(tmp_path, shakespeare_chars, resume=True, max_steps=9, optimizer="muon")


def test_state_dict_mismatch_lists_names_and_shapes(tmp_path):
    model = GPT(tiny_gpt_config())
    state = model.state_dict()
    state["blocks.0.mlp.fc.weight"] = torch.zeros(3, 3)
    del state["ln_f.bias"]
    state["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['ln_f.bias'\]; unexpected \['extra'\]; shape mismatches "
                                         r"\['blocks.0.mlp.fc.weight: checkpoint \(3, 3\) vs model \(128, 32\)'\]"):
        ckpt.check_state_dict(model, state, tmp_path)


def test_tied_weights_are_stored_once_and_restored(tmp_path):
    model = GPT(tiny_gpt_config())
    ckpt.save_state_dict(model.state_dict(), tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(tmp_path / "m.safetensors")
    state = ckpt.load_state_dict_file(tmp_path / "m.safetensors")
    assert torch.equal(state["lm_head.weight"], model.lm_head.weight)
