"""What every weight family shares: the name maps' outer tensors, strict lookups, the HF
options checked, and reading a folder's weights (`read_state_dict`: one .safetensors file,
its sharded index, or pytorch_model.bin without unpickling objects)."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from minigpt.files import DamagedWeightsError, damaged, load_safetensors, read_json


# Tensors outside the blocks, named alike in GPT-2 and GPT-Neo: HF name -> minigpt name.
OUTER_NAMES = {
    "wte.weight": "tok_emb.weight",
    "wpe.weight": "pos_emb.weight",
    "ln_f.weight": "ln_f.weight",
    "ln_f.bias": "ln_f.bias",
}


def map_to_minigpt(source: dict, n_layer: int, block_to_minigpt) -> dict[str, torch.Tensor]:
    """HF tensors (without the "transformer." prefix) -> minigpt names. Consumes `source`."""
    out = {name: take(source, hf_name) for hf_name, name in OUTER_NAMES.items()}
    for i in range(n_layer):
        out.update({f"blocks.{i}.{k}": v for k, v in block_to_minigpt(source, f"h.{i}.").items()})
    return out


def map_from_minigpt(state: dict, n_layer: int, block_from_minigpt) -> dict[str, torch.Tensor]:
    """minigpt tensors -> HF *ForCausalLM names (the tied head is not stored)."""
    out = {f"transformer.{hf_name}": state[name] for hf_name, name in OUTER_NAMES.items()}
    for i in range(n_layer):
        out.update({f"transformer.h.{i}.{k}": v for k, v in block_from_minigpt(state, f"blocks.{i}.").items()})
    return out


def take(source: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Remove and return `name` from `source`; a missing tensor is a clear error."""
    if name not in source:
        raise KeyError(name)
    return source.pop(name)


def gpt2_special_tokens(config) -> dict:
    """bos/eos ids for config.json: GPT-2's <|endoftext|> when the vocabulary has it."""
    eos = 50256
    return {"bos_token_id": eos, "eos_token_id": eos} if config.vocab_size > eos else {}


# Hugging Face `activation_function` names <-> minigpt's `activation`.
ACTIVATION_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
ACTIVATION_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu"}


def check_hf_options(hf: dict, model_type: str, supported: dict[str, tuple]) -> None:
    """Reject Hugging Face config options whose behaviour minigpt does not implement."""
    for key, allowed in supported.items():
        if key in hf and hf[key] not in allowed:
            raise ValueError(
                f"{model_type} config: {key}={hf[key]!r} is not supported by minigpt (supported: {allowed})"
            )


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint folder: model.safetensors (or its sharded index), else
    pytorch_model.bin read with ``weights_only=True`` (no arbitrary unpickling).

    Raises FileNotFoundError when there are no weights and `DamagedWeightsError` when a
    weights file cannot be read.
    """
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    legacy = folder / "pytorch_model.bin"
    if single.is_file():
        return load_safetensors(single)
    if index.is_file():
        weight_map = read_json(index, "sharded weights index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise DamagedWeightsError(f"sharded weights index {index} has no \"weight_map\" object; "
                                      f"re-save or re-download the model")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{index} lists the shard {shard}, which is not in {folder}; "
                                        f"re-download the model")
            state.update(load_safetensors(folder / shard))
        return state
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise DamagedWeightsError(
                f"{legacy} holds objects other than tensors, or is damaged, and is not loaded for safety; "
                f"convert it to safetensors or re-download it"
            ) from None
        except (RuntimeError, EOFError, OSError) as err:
            raise damaged(legacy, err) from None
    raise FileNotFoundError(
        f"{folder} has no weights: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )
