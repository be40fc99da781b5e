"""minigpt's hook points against TransformerLens's own, by name and value, on the same weights.

The peer is TransformerLens 3's `HookedTransformer` (the newest line that has it; 4.0
replaced it by `TransformerBridge`), built offline from a config and loaded with no weight
processing (no LayerNorm folding, no centring), so that every activation means what it
means in the original model. Both load one tiny random GPT-2 (and GPT-Neo, for banded
layers) saved by `transformers`, its LayerNorm gains and biases moved away from 1 and 0 so
that pre- and post-affine values differ, and its query and key weights scaled up so that
attention patterns are far from uniform.

Tolerance: float32, max abs difference <= 1e-5 on every shared name (the two compute the
same operations in different orders; observed about 1e-7). Masked attention scores are
-inf in both and compared as such.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers

from minigpt import GPT

with warnings.catch_warnings():  # its import warns about optional packages it does not need here
    warnings.simplefilter("ignore")
    # An extra of [test], installed by the README's test command; the GPU machine, which
    # installs nothing, skips these.
    pytest.importorskip("transformer_lens")
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_neo_weights

ATOL = 1e-5
"""float32 max abs difference allowed on any activation or logit."""
V, T_MAX = 61, 24
OPTIONS = ("use_attn_result", "use_attn_in", "use_split_qkv_input", "use_hook_mlp_in", "use_hook_tokens")


def perturbed_(hf: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(("c_attn.weight", "q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)  # sharper patterns than a fresh init's near-uniform ones, so that q and k matter
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return hf.eval()


def gpt2_pair(tmp_path) -> tuple[GPT, HookedTransformer]:
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=T_MAX, vocab_size=V,
                                     activation_function="gelu_new")
    hf = perturbed_(transformers.GPT2LMHeadModel(hf_cfg), seed=1)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=T_MAX, d_head=8, n_heads=4, d_mlp=128, d_vocab=V, act_fn="gelu_new",
        normalization_type="LN", eps=hf_cfg.layer_norm_epsilon, original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False)
    return _pair(tmp_path, hf, cfg, convert_gpt2_weights)


def neo_pair(tmp_path) -> tuple[GPT, HookedTransformer]:
    torch.manual_seed(0)
    hf_cfg = transformers.GPTNeoConfig(num_layers=2, hidden_size=32, num_heads=4, max_position_embeddings=T_MAX,
                                       vocab_size=V, attention_types=[[["global", "local"], 1]], window_size=5)
    hf = perturbed_(transformers.GPTNeoForCausalLM(hf_cfg), seed=2)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=T_MAX, d_head=8, n_heads=4, d_mlp=128, d_vocab=V, act_fn="gelu_new",
        normalization_type="LN", eps=hf_cfg.layer_norm_epsilon, original_architecture="GPTNeoForCausalLM",
        use_local_attn=True, attn_types=["global", "local"], window_size=5, use_attn_scale=False,
        default_prepend_bos=False)
    return _pair(tmp_path, hf, cfg, convert_neo_weights)


def _pair(tmp_path, hf, cfg, convert) -> tuple[GPT, HookedTransformer]:
    hf.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(tmp_path / "hf").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = HookedTransformer(cfg)
    peer.load_and_process_state_dict(convert(hf, cfg), fold_ln=False, center_writing_weights=False,
                                     center_unembed=False, fold_value_biases=False)
    return ours, peer.eval()


PAIRS = {"gpt2": gpt2_pair, "gpt-neo": neo_pair}


def tokens(B: int = 2, T: int = 13, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def switch(model, peer, options) -> None:
    for option in options:
        getattr(model, f"set_{option}")(True)
        if option == "use_hook_tokens":  # TransformerLens builds this point from its config only
            peer.cfg.use_hook_tokens = True
            peer.hook_tokens = type(peer.hook_embed)()
            peer.setup()
        else:
            getattr(peer, f"set_{option}")(True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite) and torch.equal(a[~finite], b[~finite])
    return (a[finite].double() - b[finite].double()).abs().max().item() if finite.any() else 0.0


@pytest.mark.parametrize("arch", PAIRS)
@pytest.mark.parametrize("options", [(), *((o,) for o in OPTIONS), OPTIONS], ids=lambda o: "+".join(o) or "default")
def test_every_hook_transformer_lens_fires_has_its_value_here(tmp_path, arch, options):
    model, peer = PAIRS[arch](tmp_path)
    switch(model, peer, options)
    idx = tokens()
    peer_logits, peer_cache = peer.run_with_cache(idx)
    logits, cache = model.run_with_cache(idx)
    missing = [name for name in peer_cache if name not in cache]
    assert not missing, f"TransformerLens fires {missing}, minigpt does not"
    diffs = {name: max_diff(cache[name], peer_cache[name]) for name in peer_cache}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= ATOL, f"{worst} differs by {diffs[worst]:.2e}"
    assert max_diff(logits, peer_logits) <= ATOL
    # What minigpt has beyond TransformerLens: each LayerNorm's output after gain and bias.
    assert {name for name in cache if name not in peer_cache} == {n for n in cache if n.endswith("hook_out")
                                                                   and not n.startswith("unembed")}


def edits() -> dict[str, tuple[str, object]]:
    """Hooks that change the forward, each as TransformerLens code would write it."""
    def ablate_head_1(z, hook):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    def double(act, hook):
        return 2 * act

    direction = torch.randn(32, generator=torch.Generator().manual_seed(4))  # LayerNorm undoes a scale or a shift

    def shift_head_2(x, hook):  # one head's input alone
        x = x.clone()
        x[:, :, 2] += direction
        return x

    def shift(x, hook):
        return x + direction

    return {
        "ablate hook_z": ("blocks.0.attn.hook_z", ablate_head_1),
        "patch ln1.hook_normalized": ("blocks.1.ln1.hook_normalized", double),
        "patch ln2.hook_scale": ("blocks.0.ln2.hook_scale", double),
        "patch ln_final.hook_normalized": ("ln_final.hook_normalized", double),
        "patch attn.hook_result": ("blocks.1.attn.hook_result", ablate_head_1),
        "patch hook_q_input": ("blocks.0.hook_q_input", shift_head_2),
        "patch hook_v_input": ("blocks.1.hook_v_input", shift_head_2),
        "patch hook_attn_in": ("blocks.1.hook_attn_in", shift_head_2),
        "patch hook_mlp_in": ("blocks.0.hook_mlp_in", shift),
        "patch attn.hook_pattern": ("blocks.1.attn.hook_pattern", double),
        "patch unembed.hook_in": ("unembed.hook_in", double),
    }


@pytest.mark.parametrize("arch", PAIRS)
@pytest.mark.parametrize("edit", edits())
def test_the_same_intervention_gives_the_same_logits(tmp_path, arch, edit):
    model, peer = PAIRS[arch](tmp_path)
    name, fn = edits()[edit]
    needs = {"hook_result": "use_attn_result", "hook_q_input": "use_split_qkv_input",
             "hook_v_input": "use_split_qkv_input", "hook_attn_in": "use_attn_in", "hook_mlp_in": "use_hook_mlp_in"}
    switch(model, peer, [o for suffix, o in needs.items() if name.endswith(suffix)])
    idx = tokens()
    clean = peer(idx)
    expected = peer.run_with_hooks(idx, fwd_hooks=[(name, fn)])
    actual = model.run_with_hooks(idx, fwd_hooks=[(name, fn)])
    assert (expected - clean).abs().max() > 1e-3  # the edit matters
    assert max_diff(actual, expected) <= ATOL


def test_an_optional_point_that_is_off_says_which_switch_turns_it_on(tmp_path):
    model, _ = gpt2_pair(tmp_path)
    with pytest.raises(ValueError, match=r"set_use_attn_result\(True\)"):
        model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.attn.hook_result", lambda a, h: None)])
    _, cache = model.run_with_cache(tokens())
    with pytest.raises(KeyError, match=r"set_use_split_qkv_input\(True\)"):
        cache["blocks.0.hook_q_input"]
