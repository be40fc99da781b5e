"""Parity with the reference implementation (Hugging Face transformers), no downloads:
tiny random models are built locally, saved with save_pretrained and loaded by minigpt."""
import dataclasses
import json

import pytest
import torch

from minigpt import GPT, GPTConfig
from tests.helpers import randomize_

transformers = pytest.importorskip("transformers")

LOGITS_ATOL = 1e-4  # float32, as the issue states


def hf_gpt2(seed=0):
    config = transformers.GPT2Config(vocab_size=97, n_positions=40, n_embd=32, n_layer=3, n_head=4,
                                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(seed)
    return randomize_(transformers.GPT2LMHeadModel(config), seed, std=0.2).eval()


def hf_gpt_neo(seed=0, window=3):
    config = transformers.GPTNeoConfig(vocab_size=97, max_position_embeddings=40, hidden_size=32, num_layers=4,
                                       num_heads=4, attention_types=[[["global", "local"], 2]], window_size=window,
                                       embed_dropout=0, attention_dropout=0, resid_dropout=0)
    torch.manual_seed(seed)
    return randomize_(transformers.GPTNeoForCausalLM(config), seed, std=0.2).eval()


@pytest.fixture(params=["gpt2", "gpt_neo"])
def hf_model(request):
    return hf_gpt2() if request.param == "gpt2" else hf_gpt_neo()


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_loaded_logits_match_transformers(hf_model, tmp_path, backend):
    hf_model.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path, backend=backend).eval()
    idx = torch.randint(0, 97, (2, 37))
    with torch.no_grad():
        expected = hf_model(idx).logits
    torch.testing.assert_close(model(idx).logits, expected, rtol=0, atol=LOGITS_ATOL)


def test_gpt_neo_config_maps_its_architecture(tmp_path):
    hf_gpt_neo(window=3).save_pretrained(tmp_path)
    config = GPT.from_pretrained(tmp_path).config
    assert config.layer_kinds == ("dense", "banded", "dense", "banded")
    assert config.attention_window == 3 and config.attention_scale == 1.0 and not config.qkv_bias


def test_greedy_generation_matches_transformers_token_for_token(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path)
    prompt = torch.randint(0, 97, (1, 6))
    expected = hf_model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True,
                                 pad_token_id=0, eos_token_id=None)[0, 6:].tolist()
    for use_cache in (True, False):
        assert model.generate(prompt, 20, temperature=0, use_cache=use_cache)[0] == expected


def test_round_trip_minigpt_to_transformers(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    model = GPT.from_pretrained(tmp_path / "hf")
    model.save_pretrained(tmp_path / "mini")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mini").eval()
    idx = torch.randint(0, 97, (2, 25))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, model(idx).logits, rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo"])
def test_exact_gelu_models_match_transformers_both_ways(family, tmp_path):
    hf = hf_gpt2() if family == "gpt2" else hf_gpt_neo()
    config = json.loads(hf.config.to_json_string())
    config["activation_function"] = "gelu"
    hf = randomize_(type(hf)(type(hf.config).from_dict(config)), 1, std=0.5).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = GPT.from_pretrained(tmp_path / "hf").eval()
    assert model.config.activation == "gelu"
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        expected = hf(idx).logits
        torch.testing.assert_close(model(idx).logits, expected, rtol=0, atol=LOGITS_ATOL)
        # The tanh form differs measurably with these weights, so the test can tell the two apart.
        tanh = GPT(dataclasses.replace(model.config, activation="gelu_tanh"))
        tanh.load_state_dict(model.state_dict())
        assert (tanh(idx).logits - expected).abs().max() > 10 * LOGITS_ATOL
    model.save_pretrained(tmp_path / "mini")
    assert json.loads((tmp_path / "mini" / "config.json").read_text())["activation_function"] == "gelu"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mini").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, expected, rtol=0, atol=LOGITS_ATOL)


def test_config_without_hf_architecture_round_trips_natively(tmp_path):
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=8,
                       attention_pattern=("dense", "banded"), attention_window=4)  # GPT-3 style
    model = randomize_(GPT(config)).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "minigpt"
    reloaded = GPT.from_pretrained(tmp_path)
    assert reloaded.config == config
    idx = torch.randint(0, 50, (1, 16))
    torch.testing.assert_close(reloaded(idx).logits, model(idx).logits, rtol=0, atol=0)


def test_pytorch_model_bin_is_read_with_weights_only(tmp_path):
    from safetensors.torch import load_file

    hf = hf_gpt2()
    hf.save_pretrained(tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    model = GPT.from_pretrained(tmp_path)
    idx = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, hf(idx).logits, rtol=0, atol=LOGITS_ATOL)


def test_pickled_objects_are_refused(tmp_path):
    hf_gpt2().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"wte.weight": torch.zeros(2), "evil": object()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="objects other than tensors"):
        GPT.from_pretrained(tmp_path)


def test_missing_unknown_and_misshapen_tensors_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_gpt2().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["transformer.h.0.attn.extra.weight"] = torch.zeros(3)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="does not know.*h.0.attn.extra.weight"):
        GPT.from_pretrained(tmp_path)
    del tensors["transformer.h.0.attn.extra.weight"]
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensor 'h.1.mlp.c_fc.bias'"):
        GPT.from_pretrained(tmp_path)
    tensors["transformer.h.1.mlp.c_fc.bias"] = torch.zeros(7)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"blocks.1.mlp.fc.bias: checkpoint \(7,\) vs model \(128,\)"):
        GPT.from_pretrained(tmp_path)


def test_unsupported_hf_options_and_folders_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama' is not supported"):
        GPT.from_pretrained(tmp_path)
    hf_gpt2().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="activation_function='relu' is not supported"):
        GPT.from_pretrained(tmp_path)
