"""Applied from outside the model: activation checkpointing changes memory, not the numbers."""
from __future__ import annotations

import torch

from minigpt import GPT
from minigpt.train.parallel import parallelize
from tests.train.common import quick_train_config, tiny_gpt_config


def _loss_and_grads(checkpointing: bool, tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config(dropout=0.1))
    idx = torch.randint(0, 65, (2, 32))
    config = quick_train_config(tmp_path, activation_checkpointing=checkpointing)
    torch.manual_seed(1)  # the dropout masks
    with parallelize(model, config, "none", torch.device("cpu")) as module:
        loss = module(idx, idx).loss
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    loss, grads, model = _loss_and_grads(False, tmp_path)
    loss_ckpt, grads_ckpt, model_ckpt = _loss_and_grads(True, tmp_path)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=0, msg=name)
    assert "forward" not in model_ckpt.blocks[0].__dict__  # undone on exit: the caller's model as it was
    assert model_ckpt.state_dict().keys() == model.state_dict().keys()


def test_training_with_activation_checkpointing_gives_the_same_losses(tmp_path, shakespeare_chars):
    from minigpt.pretrain import RandomWindows, TokenSplit
    from minigpt.train import train

    def run(checkpointing: bool):
        torch.manual_seed(0)
        model = GPT(tiny_gpt_config(dropout=0.1))
        batches = RandomWindows(TokenSplit(shakespeare_chars, "train"), 32, 4, seed=0)
        config = quick_train_config(tmp_path / str(checkpointing), activation_checkpointing=checkpointing, max_steps=3)
        return train(model, config, batches).train_losses

    assert run(True) == run(False)


def _compiled_loss_and_grads(compile_: bool, checkpointing: bool, tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config())
    idx = torch.randint(0, 65, (2, 32))
    config = quick_train_config(tmp_path, compile=compile_, activation_checkpointing=checkpointing)
    with parallelize(model, config, "none", torch.device("cpu")) as module:
        assert module is model  # compiled in place, block by block: no wrapper, no `_orig_mod.` keys
        compiled = [b._compiled_call_impl is not None for b in model.blocks]
        loss = module(idx, idx).loss
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model, compiled


def test_compile_compiles_each_block_and_gives_the_eager_numbers(tmp_path):
    # float32 on the CPU: inductor may fuse and reorder, so the tolerances are float32's, not zero.
    loss, grads, _, _ = _compiled_loss_and_grads(False, False, tmp_path / "eager")
    for checkpointing in (False, True):
        got, got_grads, model, compiled = _compiled_loss_and_grads(True, checkpointing, tmp_path / f"c{checkpointing}")
        assert all(compiled) and len(compiled) == len(model.blocks)
        torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(got_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
        # Undone on exit: the caller's model runs eagerly again (sampling would otherwise recompile).
        assert all(b._compiled_call_impl is None and "forward" not in b.__dict__ for b in model.blocks)
