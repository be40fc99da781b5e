"""A HookPoint is a plain identity nn.Module, so every way torch has of hooking a module runs
at it (direct, pre, backward and global hooks), and removing the hooks brings back the
bit-identical forward."""
import copy

import pytest
import torch
from torch.nn.modules import module as torch_module

from minigpt import GPT, GPTConfig
from minigpt.hooks import HookPoint, hook_points
from tests.helpers import randomize_


def model_and_tokens() -> tuple[GPT, torch.Tensor]:
    config = GPTConfig(vocab_size=53, block_size=32, n_layer=2, n_head=2, n_embd=16,
                       attention_pattern=("dense", "banded"), attention_window=4)
    torch.manual_seed(0)
    model = randomize_(GPT(config), 0).eval()
    return model, torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(1))


def test_hooks_registered_directly_on_a_point_fire_and_their_removal_restores_the_forward():
    model, idx = model_and_tokens()
    point = model.blocks[1].hook_resid_mid
    clean = model(idx).logits
    calls = []
    handles = [
        point.register_forward_pre_hook(lambda module, args: calls.append("pre")),
        point.register_forward_hook(lambda module, args, out: calls.append("fwd") or 2 * out),
        point.register_full_backward_hook(lambda module, grad_in, grad_out: calls.append("bwd")),
    ]
    hooked = model(idx).logits
    assert calls == ["pre", "fwd"] and not torch.equal(hooked, clean)
    hooked.sum().backward()
    assert calls == ["pre", "fwd", "bwd"]
    for handle in handles:
        handle.remove()
    assert not point.active
    assert torch.equal(model(idx).logits, clean)


def test_global_module_hooks_still_run_at_every_hook_point_the_forward_passes():
    model, idx = model_and_tokens()
    seen = []

    def record(module, args, out):
        if isinstance(module, HookPoint):
            seen.append(module.name)

    handle = torch_module.register_module_forward_hook(record)
    try:
        model(idx)
    finally:
        handle.remove()
    # Called only on the math path or a LayerNorm's spelled-out path, when hooked; optional
    # points only when switched on.
    when_hooked = ("hook_attn_scores", "hook_pattern", "hook_scale", "hook_normalized")
    assert sorted(seen) == sorted(name for name, p in hook_points(model).items()
                                  if p.enabled and not name.endswith(when_hooked))
    assert len(seen) == 2 + 2 * 13 + 1 + 2  # embeddings, 13 per block, ln_final.hook_out, unembed in/out


def test_global_forward_pre_hook_can_replace_a_hook_points_input():
    model, idx = model_and_tokens()
    clean = model(idx).logits

    def zero_resid_post_of_the_last_block(module, args):
        if module is model.blocks[-1].hook_resid_post:
            return (torch.zeros_like(args[0]),)

    handle = torch_module.register_module_forward_pre_hook(zero_resid_post_of_the_last_block)
    try:
        hooked = model(idx).logits
    finally:
        handle.remove()
    expected = model.lm_head(model.ln_f(torch.zeros(2, 9, 16)))  # what the head makes of a zero stream
    torch.testing.assert_close(hooked, expected)
    assert torch.equal(model(idx).logits, clean)


@pytest.mark.parametrize("route", ["add_hook", "register_forward_hook"])
def test_a_deep_copy_of_a_hooked_model_keeps_its_hooks(route):
    model, idx = model_and_tokens()
    point = model.blocks[0].hook_attn_out
    if route == "add_hook":
        point.add_hook(lambda act, hook: torch.zeros_like(act))
    else:
        point.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(idx).logits, model(idx).logits, rtol=0, atol=0)
    model.blocks[0].hook_attn_out._forward_hooks.clear()  # the original loses its hook, the copy keeps it
    assert not torch.equal(twin(idx).logits, model(idx).logits)
