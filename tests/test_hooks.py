"""Hook points, run_with_cache / run_with_hooks, and the experiments built on them."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F

import minigpt.hooks

from minigpt import GPT, GPTConfig, ops
from minigpt.experiments import (ablate_heads, direct_logit_attribution, head_scores, logit_diff_metric,
                                 patch_heads, patch_residual)
from minigpt.hooks import hook_points
from tests.helpers import randomize_

V = 53


def gpt2_like(**changes) -> GPTConfig:
    base = dict(vocab_size=V, block_size=32, n_layer=3, n_head=4, n_embd=32)  # dense, biases, tanh GELU
    return GPTConfig(**{**base, **changes})


def banded(**changes) -> GPTConfig:
    return gpt2_like(**{"n_layer": 4, "attention_pattern": ("dense", "banded"), "attention_window": 4, **changes})


def model_for(config: GPTConfig, backend: str = "sdpa", seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return randomize_(GPT(config, backend=backend), seed).eval()


def tokens(B=2, T=11, seed=1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# TransformerLens's hook names for GPT-2 (HookedTransformer, default settings), written out
# here rather than imported (tests/peers compares the values with TransformerLens itself).
# minigpt has every one, plus each LayerNorm's output after its gain and bias (`hook_out`).
TL_GPT2_PER_BLOCK = [
    "hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
    "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
    "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
]
TL_GPT2_TOP = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized",
               "unembed.hook_in", "unembed.hook_out"]


SPELLED_OUT = ("hook_scale", "hook_normalized")
"""LayerNorm hook points that exist only on its spelled-out path, taken while they are hooked."""


def with_ln_out(names: list[str]) -> list[str]:
    """`names` with minigpt's `hook_out` after each LayerNorm's `hook_normalized`."""
    return [m for n in names for m in ([n, n.replace("hook_normalized", "hook_out")] if "hook_normalized" in n else [n])]


def tl_shape(name: str, B: int, T: int, cfg: GPTConfig) -> tuple:
    """TransformerLens's documented shape of each activation (jaxtyping names in brackets)."""
    if name.endswith(("hook_q", "hook_k", "hook_v", "hook_z")):
        return (B, T, cfg.n_head, cfg.head_dim)  # batch pos head_index d_head
    if name.endswith(("hook_attn_scores", "hook_pattern")):
        return (B, cfg.n_head, T, T)  # batch head_index query_pos key_pos
    if name.endswith(("mlp.hook_pre", "mlp.hook_post")):
        return (B, T, 4 * cfg.n_embd)  # batch pos d_mlp
    if name.endswith("hook_scale"):
        return (B, T, 1)  # batch pos 1
    if name == "unembed.hook_out":
        return (B, T, cfg.vocab_size)  # batch pos d_vocab
    return (B, T, cfg.n_embd)  # batch pos d_model


def test_names_and_shapes_match_transformer_lens_for_gpt2():
    cfg = gpt2_like()
    model = model_for(cfg)
    idx = tokens(2, 7)
    logits, cache = model.run_with_cache(idx)
    tl_order = TL_GPT2_TOP[:2] + [f"blocks.{i}.{n}" for i in range(cfg.n_layer) for n in TL_GPT2_PER_BLOCK]
    tl_order += TL_GPT2_TOP[2:]
    assert list(cache) == with_ln_out(tl_order)  # every name, in forward order
    for name, act in cache.items():
        assert tuple(act.shape) == tl_shape(name, 2, 7, cfg), name
    assert torch.equal(cache["z", 1], cache["blocks.1.attn.hook_z"])
    assert torch.equal(cache["normalized", 2, "ln2"], cache["blocks.2.ln2.hook_normalized"])
    torch.testing.assert_close(logits, model(idx).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["math", "sdpa", "triton"])
def test_cache_views_equal_output_hidden_states_and_attentions(backend):
    model = model_for(banded(), backend)
    idx = tokens()
    out = model(idx, output_hidden_states=True, output_attentions=True)
    # Everything but the LayerNorms' scale and normalized input, which move a LayerNorm to
    # its spelled-out path (equal within float32 rounding, checked below).
    _, cache = model.run_with_cache(idx, names_filter=lambda n: not n.endswith(SPELLED_OUT))
    n = model.config.n_layer
    assert len(out.hidden_states) == n + 1 and len(out.attentions) == n
    for i in range(n):
        assert torch.equal(cache[f"blocks.{i}.hook_resid_pre"], out.hidden_states[i])
        assert torch.equal(cache[f"blocks.{i}.attn.hook_pattern"], out.attentions[i])
    assert torch.equal(cache["ln_final.hook_out"], out.hidden_states[-1])
    _, everything = model.run_with_cache(idx)
    # float32: the two LayerNorm paths round differently by an ulp or two, and the later
    # layers carry that on: 1e-4 on these unit-scale activations (1.2e-5 seen on AVX2, where
    # the CPU's LayerNorm kernels differ from AVX-512's).
    for i in range(n):
        torch.testing.assert_close(everything[f"blocks.{i}.hook_resid_pre"], out.hidden_states[i], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(everything["ln_final.hook_out"], out.hidden_states[-1], rtol=1e-5, atol=1e-4)


def reference_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The forward as minigpt computed it before hook points, op for op."""
    B, T = idx.shape
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(T))
    for block in model.blocks:
        attn = block.attn
        h = ops.layer_norm(x, block.ln_1.weight, block.ln_1.bias, block.ln_1.eps, block.ln_1.backend)
        q, k, v = attn.qkv(h).split(x.shape[-1], dim=2)
        q, k, v = (t.view(B, T, attn.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y, _ = ops.causal_attention(q, k, v, window=attn.window, scale=attn.scale, backend=attn.backend)
        x = x + attn.proj(y.transpose(1, 2).reshape(B, T, -1))
        h = ops.layer_norm(x, block.ln_2.weight, block.ln_2.bias, block.ln_2.eps, block.ln_2.backend)
        x = x + block.mlp.proj(F.gelu(block.mlp.fc(h), approximate=block.mlp.approximate))
    x = ops.layer_norm(x, model.ln_f.weight, model.ln_f.bias, model.ln_f.eps, model.ln_f.backend)
    return model.lm_head(x)


@pytest.mark.parametrize("backend", ["math", "sdpa", "triton"])
def test_no_hook_attached_logits_are_bit_identical_to_the_forward_without_hook_points(backend):
    model = model_for(banded(n_layer=2), backend)
    idx = tokens(2, 13)
    with torch.no_grad():
        assert torch.equal(model(idx).logits, reference_logits(model, idx))
        observe = [(lambda n: not n.endswith(("hook_attn_scores", "hook_pattern") + SPELLED_OUT), lambda act, hook: None)]
        with model.hooks(observe):  # hooks that only read change nothing either
            assert torch.equal(model(idx).logits, reference_logits(model, idx))


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_patching_every_resid_pre_at_layer_L_reproduces_the_clean_logits(backend):
    model = model_for(banded(), backend)
    clean, corrupt = tokens(seed=1), tokens(seed=2)
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        corrupt_logits = model(corrupt).logits
        assert not torch.allclose(clean_logits, corrupt_logits)
        for layer in range(model.config.n_layer):
            name = f"blocks.{layer}.hook_resid_pre"
            patched = model.run_with_hooks(corrupt, fwd_hooks=[(name, lambda act, hook: cache[hook.name])])
            assert torch.equal(patched, clean_logits), layer
            unchanged = model.run_with_hooks(corrupt, fwd_hooks=[(name, lambda act, hook: act.clone())])
            assert torch.equal(unchanged, corrupt_logits), layer
        assert torch.equal(model.run_with_hooks(corrupt), corrupt_logits)


def test_patch_residual_restores_exactly_at_the_changed_position_and_nothing_elsewhere_in_layer_0():
    model = model_for(banded())
    clean = tokens(1, 9)
    corrupt = clean.clone()
    corrupt[0, 3] = (corrupt[0, 3] + 5) % V
    metric = logit_diff_metric(answer=7, wrong=11)
    result = patch_residual(model, clean, corrupt, metric)
    assert result.values.shape == (model.config.n_layer, 9)
    assert result.values[0, 3] == result.clean  # the only position whose stream differs
    assert torch.all(result.values[0, [0, 1, 2, 4, 5, 6, 7, 8]] == result.corrupt)
    assert torch.all(result.values[:, :3] == result.corrupt)  # before the change, clean == corrupt
    heads = patch_heads(model, clean, corrupt, metric)
    assert heads.values.shape == (model.config.n_layer, model.config.n_head)
    assert torch.isfinite(heads.normalized).all()


def test_zero_ablating_a_head_equals_the_block_without_that_heads_slice_of_the_output_projection():
    model = model_for(banded())
    idx = tokens()
    layer, head = 1, 2
    D = model.config.head_dim
    ablated = ablate_heads(model, idx, [(layer, head)], "zero")
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        by_hand.blocks[layer].attn.proj.weight[:, head * D:(head + 1) * D] = 0
        expected = by_hand(idx).logits
    torch.testing.assert_close(ablated, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(ablated, model(idx).logits, atol=1e-3)

    # Mean ablation: the head writes the constant W_O[h] @ mean(z_h) instead.
    _, cache = model.run_with_cache(idx, names_filter=f"blocks.{layer}.attn.hook_z")
    mean_z = cache[f"blocks.{layer}.attn.hook_z"][:, :, head].mean(dim=(0, 1))  # (D,)
    with torch.no_grad():
        by_hand.blocks[layer].attn.proj.bias += model.blocks[layer].attn.proj.weight[:, head * D:(head + 1) * D] @ mean_z
        expected = by_hand(idx).logits
    torch.testing.assert_close(ablate_heads(model, idx, [(layer, head)], "mean"), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("config", [gpt2_like(), banded(bias=False)], ids=["gpt2", "no-bias"])
def test_dla_components_sum_to_the_final_residual_stream_and_the_logit_difference(config):
    model = model_for(config)
    idx = tokens(3, 10)
    result = direct_logit_attribution(model, idx, answer=5, wrong=9)
    n = config.n_layer
    assert len(result.labels) == 2 + n * (config.n_head + 1 + (1 if config.bias else 0))
    _, cache = model.run_with_cache(idx, names_filter=f"blocks.{n - 1}.hook_resid_post")
    final = cache[f"blocks.{n - 1}.hook_resid_post"][:, -1]  # (B, C)
    torch.testing.assert_close(result.components.sum(0), final, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(result.contributions.sum(0) + result.ln_bias, result.logit_diff, rtol=1e-5, atol=1e-4)
    assert result.logit_diff.abs().min() > 1e-3  # a real difference, not 0 = 0


def test_hooks_work_during_kv_cache_generation():
    model = model_for(banded())
    prompt = tokens(2, 6)[:1].tolist()
    seen = []

    def ablate(z, hook):
        seen.append(z.shape[1])
        z = z.clone()
        z[:, :, 1] = 0
        return z

    def read_pattern(pattern, hook):
        assert torch.allclose(pattern.sum(-1), torch.ones(()))

    plain = model.generate(prompt, 8, temperature=0)
    with model.hooks([("blocks.0.attn.hook_z", ablate), ("blocks.1.attn.hook_pattern", read_pattern)]):
        cached = model.generate(prompt, 8, temperature=0, use_cache=True)
        assert seen == [6] + [1] * 7  # prefill, then one token per step
        recomputed = model.generate(prompt, 8, temperature=0, use_cache=False)
    assert cached == recomputed
    assert cached != plain
    assert all(not p.active for p in hook_points(model).values())


def test_backward_hooks_give_gradients_and_can_replace_them():
    model = model_for(gpt2_like())
    idx = tokens()
    targets = tokens(seed=3)
    logits, cache = model.run_with_cache(idx, incl_bwd=True, targets=targets)
    # d loss / d (final normed stream) = d loss / d logits @ W_U, by hand; and through the
    # gain, the gradient of the pre-affine normalized stream.
    dlogits = (torch.softmax(logits, -1) - F.one_hot(targets, V)) / targets.numel()
    for name in ("ln_final.hook_out_grad", "unembed.hook_in_grad"):
        torch.testing.assert_close(cache[name], dlogits @ model.lm_head.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cache["ln_final.hook_normalized_grad"],
                               dlogits @ model.lm_head.weight * model.ln_f.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cache["unembed.hook_out_grad"], dlogits, rtol=1e-4, atol=1e-7)
    model.zero_grad()
    out = model.run_with_hooks(idx, return_type="output", targets=targets,
                               bwd_hooks=[("blocks.1.hook_resid_pre", lambda g, hook: torch.zeros_like(g))])
    out.loss.backward()
    assert model.blocks[0].mlp.fc.weight.grad.abs().max() == 0  # nothing flows past block 1
    assert model.blocks[2].mlp.fc.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="differentiates a scalar"):
        model.run_with_cache(idx, incl_bwd=True)


def test_pattern_hooks_switch_the_layer_to_math_once_and_replacing_the_pattern_changes_the_output(caplog):
    model = model_for(banded(), "sdpa")
    idx = tokens()
    base = model(idx).logits
    minigpt.hooks._log_math_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="minigpt.hooks"):
        for _ in range(2):
            logits, cache = model.run_with_cache(idx, names_filter="blocks.0.attn.hook_pattern")
    assert sum("exist only on the math path" in r.message for r in caplog.records) == 1
    torch.testing.assert_close(logits, base, rtol=1e-5, atol=1e-5)
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, 4, 11, 11)

    def uniform(pattern, hook):
        allowed = pattern > 0
        return allowed / allowed.sum(-1, keepdim=True)

    changed = model.run_with_hooks(idx, fwd_hooks=[("blocks.0.attn.hook_pattern", uniform)])
    assert not torch.allclose(changed, base, atol=1e-3)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_q_k_v_z_hooks_leave_the_fused_path_in_place_and_agree_with_math(backend):
    idx = tokens()
    names = lambda n: n.endswith(("hook_q", "hook_k", "hook_v", "hook_z"))  # noqa: E731
    _, fused = model_for(banded(), backend).run_with_cache(idx, names_filter=names)
    _, math = model_for(banded(), "math").run_with_cache(idx, names_filter=names)
    for name in math:
        torch.testing.assert_close(fused[name], math[name], rtol=1e-4, atol=1e-5)


def test_unknown_names_and_bad_hooks_raise_clear_errors():
    model = model_for(gpt2_like())
    idx = tokens()
    with pytest.raises(ValueError, match=r"did you mean blocks\.0\.ln1\.hook_normalized"):
        model.run_with_cache(idx, names_filter="blocks.0.ln_1.hook_normalized")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.hook_z"):
        model.run_with_hooks(idx, fwd_hooks=[("blocks.0.attn.hook_zz", lambda a, h: None)])
    with pytest.raises(ValueError, match="selects none"):
        model.run_with_cache(idx, names_filter=lambda n: "nothing" in n)
    with pytest.raises(ValueError, match="pairs"):
        model.run_with_hooks(idx, fwd_hooks=["hook_embed"])
    with pytest.raises(KeyError, match="did you mean"):
        model.run_with_cache(idx, names_filter="hook_embed")[1]["hook_embd"]
    with pytest.raises(ValueError, match=r"heads \[\(3, 0\)\] out of range"):
        ablate_heads(model, idx, [(3, 0)])


def test_hooks_context_removes_what_it_added_even_when_the_body_raises():
    model = model_for(gpt2_like())
    with pytest.raises(RuntimeError):
        with model.hooks([(lambda n: True, lambda a, h: None)], [("hook_embed", lambda g, h: None)]):
            assert all(p.active for p in hook_points(model).values() if p.enabled)
            raise RuntimeError("boom")
    assert not any(p.active for p in hook_points(model).values())


def test_head_scores_find_a_planted_induction_head_and_a_previous_token_head():
    model = model_for(banded(), "sdpa")
    half = 6
    T = 2 * half

    def plant(pattern, hook):  # head 0 of layer 1: induction; head 1: previous token
        new = pattern.clone()
        i = torch.arange(half, T)
        new[:, 0] = 0
        new[:, 0, i, i - half + 1] = 1
        new[:, 1] = 0
        new[:, 1, torch.arange(1, T), torch.arange(T - 1)] = 1
        return new

    with model.hooks([("blocks.1.attn.hook_pattern", plant)]):
        scores = head_scores(model, half=half, batch=2)
    assert scores.induction[1, 0] == 1 and scores.previous[1, 1] == 1
    assert scores.induction.shape == scores.previous.shape == (4, 4)
    assert scores.induction[0].max() < 0.9


def saved_char_model(tmp_path):
    from minigpt import CharTokenizer
    from minigpt.tokenizer import save_tokenizer

    alphabet = "abcdefghij .\n"
    model = model_for(banded(vocab_size=len(alphabet)))
    model.save_pretrained(tmp_path)
    save_tokenizer(CharTokenizer(alphabet), tmp_path)
    return tmp_path


def test_cli_heads_and_patch_write_pngs_and_reject_bad_prompts(tmp_path, capsys):
    from minigpt.cli import main

    folder = saved_char_model(tmp_path / "m")
    main(["heads", "--model", str(folder), "--out", str(tmp_path / "heads.png"), "--half", "8"])
    out = capsys.readouterr().out
    assert "top induction heads: L" in out and (tmp_path / "heads.png").read_bytes()[:4] == b"\x89PNG"
    main(["patch", "--model", str(folder), "--clean", "abc dej", "--corrupt", "abc fej",
          "--answer", "d", "--wrong", "f", "--out", str(tmp_path / "patch.png")])
    assert "logit difference: clean" in capsys.readouterr().out
    assert (tmp_path / "patch.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="same, non-zero number of tokens"):
        main(["patch", "--model", str(folder), "--clean", "abc", "--corrupt", "ab", "--answer", "d", "--wrong", "f"])
    with pytest.raises(SystemExit, match="exactly one token"):
        main(["patch", "--model", str(folder), "--clean", "abc", "--corrupt", "abd", "--answer", "de", "--wrong", "f"])


def test_hook_points_are_named_once_when_the_model_is_built_and_keep_their_names_when_wrapped():
    from minigpt.hooks import HookPoint, name_hook_points

    model = model_for(gpt2_like())
    assert model.blocks[0].ln_1.hook_normalized.name == "blocks.0.ln1.hook_normalized"  # before any lookup
    wrapped = torch.nn.Sequential(copy.deepcopy(model))  # module paths "0.blocks.0...", names unchanged
    assert list(hook_points(wrapped)) == list(hook_points(model))
    model.blocks[0].attn.hook_z = HookPoint()
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.hook_z' has no name.*name_hook_points"):
        hook_points(model)
    name_hook_points(model)
    _, cache = model.run_with_cache(tokens(), names_filter="blocks.0.attn.hook_z")
    assert cache["blocks.0.attn.hook_z"].shape == (2, 11, 4, 8)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_hidden_states_and_attentions_leave_no_hook_behind_even_when_the_forward_raises(backend):
    model = model_for(banded(), backend)
    idx = tokens()
    out = model(idx, output_hidden_states=True, output_attentions=True)
    assert not any(p.active for p in hook_points(model).values())
    assert torch.equal(model(idx, output_hidden_states=True).logits, model(idx).logits)  # states need no hook
    def fail(act, hook):
        raise RuntimeError("a hook failed")

    with pytest.raises(RuntimeError, match="a hook failed"), model.hooks([("blocks.2.hook_mlp_out", fail)]):
        model(idx, output_attentions=True)
    assert not any(p.active for p in hook_points(model).values())
    # Asked for under a user's hook that replaces the pattern: the views show the replacement.
    uniform = lambda p, hook: (p > 0) / (p > 0).sum(-1, keepdim=True)  # noqa: E731
    with model.hooks([("blocks.1.attn.hook_pattern", uniform)]):
        seen = model(idx, output_attentions=True).attentions[1]
    torch.testing.assert_close(seen, uniform(out.attentions[1], None))
