"""Load and save models in the Hugging Face layout (GPT-2, GPT-Neo) or minigpt's own.

Loading is strict: every source tensor is either used or explicitly dropped (the causal
mask buffers of old checkpoints, a head tied to the embedding), every minigpt tensor is
filled, and every shape is checked; any mismatch is one error that lists them all.

This package reads and writes files; it does not import the model. `GPT.from_pretrained`
passes its class in (as Hugging Face's `from_pretrained` builds `cls`), so the model may
call into weights without the two importing each other.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn as nn
from safetensors.torch import save_file

from minigpt.config import GPTConfig
from minigpt.files import BadFileError, DamagedWeightsError, read_json
from minigpt.weights import gpt2, gpt_neo
from minigpt.weights.common import map_from_minigpt, map_to_minigpt, read_state_dict

FAMILIES = {gpt2.MODEL_TYPE: gpt2, gpt_neo.MODEL_TYPE: gpt_neo}
NATIVE = "minigpt"

Model = TypeVar("Model", bound=nn.Module)


def read_config(path: str | Path) -> tuple[str, GPTConfig]:
    """(model_type, GPTConfig) of a checkpoint folder's config.json.

    Raises FileNotFoundError when `path` is not a model folder, and ValueError naming
    config.json when it is not JSON, lacks keys or holds values minigpt cannot use.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise BadFileError(f"{folder} is a file; give the model folder that holds config.json and the weights")
    config_file = folder / "config.json"
    if not config_file.exists():
        hint = (f"; for a training run folder give one of its checkpoints, e.g. {folder / 'checkpoints' / 'best'}"
                if (folder / "checkpoints").is_dir() else "")
        raise FileNotFoundError(f"{folder} has no config.json; is it a model folder?{hint}")
    hf = read_json(config_file, "model config")
    model_type = hf.get("model_type")
    if model_type != NATIVE and model_type not in FAMILIES:
        raise BadFileError(
            f"{config_file}: model_type={model_type!r} is not supported; "
            f"minigpt loads {sorted([*FAMILIES, NATIVE])}"
        )
    required = ("config",) if model_type == NATIVE else FAMILIES[model_type].REQUIRED_KEYS
    missing = [key for key in required if key not in hf]
    if missing:
        raise BadFileError(f"{config_file} (model_type={model_type!r}) lacks the keys {missing}; it is incomplete. "
                           f"Re-save or re-download the model's config.json")
    try:
        if model_type == NATIVE:
            return model_type, GPTConfig.from_dict(hf["config"])
        return model_type, FAMILIES[model_type].config_from_hf(hf)
    except ValueError as err:
        raise BadFileError(f"{config_file}: {err}") from None
    except (TypeError, KeyError) as err:  # a value of the wrong shape, e.g. a string where a list belongs
        raise BadFileError(f"{config_file} holds a value of the wrong type or shape ({type(err).__name__}: {err}); "
                           f"re-save or re-download the model's config.json") from None


def _map_to_minigpt(model_type: str, source: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    if model_type == NATIVE:
        state = dict(source)
        if config.tie_embeddings:
            state.pop("lm_head.weight", None)
        return state
    family = FAMILIES[model_type]
    # GPT2Model checkpoints have bare names; *LMHeadModel ones prefix "transformer.".
    source = {k.removeprefix("transformer."): v for k, v in source.items()}
    source.pop("lm_head.weight", None)  # tied to wte; both families require tying
    try:
        state = map_to_minigpt(source, config.n_layer, family.block_to_minigpt)
    except KeyError as err:
        raise ValueError(f"{model_type} checkpoint is missing tensor {err.args[0]!r}") from None
    unused = sorted(k for k in source if not family.DROPPED.match(k))
    if unused:
        raise ValueError(f"{model_type} checkpoint has tensors minigpt does not know: {unused}")
    return state


def load_pretrained(path: str | Path, model_class: Callable[..., Model], backend: str = "sdpa",
                    dtype: torch.dtype | None = None) -> Model:
    """`model_class(config, backend=backend)` (a GPT) filled from a checkpoint folder (config.json + weights).

    Raises FileNotFoundError when the folder, config.json or the weights are absent,
    `DamagedWeightsError` (a ValueError) when a weights file is empty or cut short, and
    ValueError when config.json or the tensors do not describe a model minigpt can build.
    """
    folder = Path(path).expanduser()
    model_type, config = read_config(folder)
    try:
        state = _map_to_minigpt(model_type, read_state_dict(folder), config)
    except DamagedWeightsError:
        raise
    except ValueError as err:
        raise BadFileError(f"{folder}: {err}; do config.json and the weights come from the same model?") from None
    model = model_class(config, backend=backend)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(s)}"
             for k, s in expected.items() if k in state and state[k].shape != s]
    if missing or unexpected or wrong:
        raise ValueError(
            f"checkpoint {folder} does not fit its config: missing={missing} unexpected={unexpected} "
            f"shape mismatches={wrong}; do config.json and the weights come from the same model? Re-save or "
            f"re-download it"
        )
    model.load_state_dict(state, strict=False)
    if dtype is not None:
        model.to(dtype)
    return model


def save_pretrained(model: nn.Module, path: str | Path) -> str:
    """Write config.json + model.safetensors; return the layout used.

    The layout is GPT-2's when the config is a GPT-2, GPT-Neo's when it is a GPT-Neo (so
    `transformers` loads it), and minigpt's own otherwise (e.g. GPT-3's banded layers
    with 1/sqrt(d) scaling, which no Hugging Face architecture expresses).
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight")
    for model_type, family in FAMILIES.items():
        if not family.unrepresentable(config):
            tensors = map_from_minigpt(state, config.n_layer, family.block_from_minigpt)
            tensors = {k: v.contiguous() for k, v in tensors.items()}
            hf_config = family.config_to_hf(config)
            break
    else:
        model_type, tensors = NATIVE, state
        hf_config = {"model_type": NATIVE, "config": config.to_dict()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return model_type
