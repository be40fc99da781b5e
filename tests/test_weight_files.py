"""Loading a model folder whose files are missing, damaged or incomplete: every failure
names the file and the fix, as one exception type a caller can catch (no transformers needed)."""
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig


def tiny_saved_model(folder):
    GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=8)).save_pretrained(folder)
    return folder


def test_zero_byte_safetensors_names_file(tmp_path):
    from minigpt.weights import DamagedWeightsError

    folder = tiny_saved_model(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(DamagedWeightsError, match=r"model\.safetensors is damaged or incomplete \(it is empty: 0 bytes\)"
                                                   r".*Re-save or re-download the model, or load another checkpoint"):
        GPT.from_pretrained(folder)


@settings(max_examples=10, deadline=None)
@given(fraction=st.floats(0.0, 0.999))
def test_truncated_safetensors_names_file(tmp_path_factory, fraction):
    from minigpt.weights import DamagedWeightsError

    folder = tiny_saved_model(tmp_path_factory.mktemp("m"))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:max(1, int(len(data) * fraction))])
    with pytest.raises(DamagedWeightsError, match=rf"weights file {weights} is damaged or incomplete"):
        GPT.from_pretrained(folder)
    assert issubclass(DamagedWeightsError, ValueError)  # the CLI prints it as one paragraph


@pytest.mark.parametrize("model_type, keys", [
    ("gpt2", "['vocab_size', 'n_positions', 'n_layer', 'n_head', 'n_embd']"),
    ("gpt_neo", "['vocab_size', 'max_position_embeddings', 'num_layers', 'num_heads', 'hidden_size']"),
    ("minigpt", "['config']"),
])
def test_config_json_missing_keys_named(tmp_path, model_type, keys):
    folder = tiny_saved_model(tmp_path / "m")
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ValueError, match=rf"config\.json \(model_type='{model_type}'\) lacks the keys "
                                         rf"{re.escape(keys)}.*Re-save or re-download"):
        GPT.from_pretrained(folder)


@pytest.mark.parametrize("text, message", [
    ('{"model_type": "gpt2",', r"is not valid JSON: .* line 1, column \d+"),
    ("", r"is empty"),
    ("[]", r"must hold an object"),
    ('{"model_type": "llama"}', r"model_type='llama' is not supported"),
])
def test_bad_config_json_names_file(tmp_path, text, message):
    folder = tiny_saved_model(tmp_path / "m")
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"config\.json.*{message}"):
        GPT.from_pretrained(folder)


def test_config_json_value_of_wrong_type_names_file_and_field(tmp_path):
    folder = tiny_saved_model(tmp_path / "m")
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, "n_layer": "2"}))
    with pytest.raises(ValueError, match=r"config\.json: GPTConfig\.n_layer='2' \(str\) must be an integer"):
        GPT.from_pretrained(folder)


def test_model_folder_that_is_missing_or_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model folder .*nope does not exist"):
        GPT.from_pretrained(tmp_path / "nope")
    folder = tiny_saved_model(tmp_path / "m")
    with pytest.raises(ValueError, match=r"config\.json is a file; give the model folder"):
        GPT.from_pretrained(folder / "config.json")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        GPT.from_pretrained(folder)


def test_weights_of_another_model_name_the_folder(tmp_path):
    folder = tiny_saved_model(tmp_path / "m")
    other = GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=8))
    other.save_pretrained(tmp_path / "other")
    (folder / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"m: gpt2 checkpoint is missing tensor 'h\.1\..*same model"):
        GPT.from_pretrained(folder)


@pytest.mark.parametrize("keep", [0, 10, 0.5])
def test_truncated_pytorch_bin_names_file(tmp_path, keep):
    import torch
    from safetensors.torch import load_file

    from minigpt.weights import DamagedWeightsError

    folder = tiny_saved_model(tmp_path / "m")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(DamagedWeightsError, match=r"pytorch_model\.bin is damaged or incomplete .*Re-save or re-download"):
        GPT.from_pretrained(folder)
