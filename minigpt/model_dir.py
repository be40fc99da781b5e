"""One notion of "a model you can point at", for every command that takes a model.

Three kinds of folder hold a model, and each command accepts all three:

    a model folder         config.json + weights (Hugging Face GPT-2/GPT-Neo layout or minigpt's,
                           a fine-tuned folder, or one checkpoint of a run)
    a fine-tuning run      `minigpt finetune ... --out RUN`: its exported best model, RUN/model
    a training run         `minigpt train --out-dir RUN`: its best checkpoint (else its newest),
                           under RUN/checkpoints

`resolve_model_dir` turns any of them into the model folder and says once, in the log,
which one it chose; `preset_model_config` is the config a preset or recipe name stands for
(fine-tuning's `--init` accepts one, for a fresh random model:
`minigpt.finetune.run.start_model`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from minigpt.model import GPT

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


def resolve_model_dir(path: str | Path) -> Path:
    """The model folder behind `path`: itself, RUN/model, or RUN's best (else newest) checkpoint
    (also when `path` is RUN/checkpoints).

    Raises FileNotFoundError listing every place it looked when none holds a model.
    """
    from minigpt.train import checkpoint as ckpt

    folder = Path(path)
    if (folder / CONFIG_FILE).is_file():
        return folder
    exported = folder / "model"
    if (exported / CONFIG_FILE).is_file():
        log.info("%s is a fine-tuning run; using its exported best model %s", folder, exported)
        return exported
    root = folder / "checkpoints"
    if not root.is_dir() and any(folder.glob("step_*")):  # RUN/checkpoints itself: the same choice
        root = folder
    chosen = None
    if root.is_dir():
        best = ckpt.best_checkpoint(root)
        chosen = best or ckpt.latest_checkpoint(root)
        if chosen is not None:
            which = "best" if best is not None else "newest (no best recorded)"
            log.info("%s is a training run; using its %s checkpoint %s", folder, which, chosen)
            return chosen
    looked = (f"{folder / CONFIG_FILE} (a model folder), {exported / CONFIG_FILE} (a fine-tuning run's "
              f"exported model), {root}/ (a training run's checkpoints)")
    if not folder.exists():
        raise FileNotFoundError(f"model {folder} does not exist; looked for {looked}")
    raise FileNotFoundError(f"{folder} holds no model (no config.json): looked for {looked}"
                            + ("; the run has no checkpoint yet" if root.is_dir() else ""))


def preset_model_config(name: str):
    """The GPTConfig of a model preset (minigpt.presets.PRESETS) or a pretraining recipe's model
    (e.g. tiny-bpe); None when `name` is neither."""
    from minigpt.config import GPTConfig
    from minigpt.presets import PRESETS
    from minigpt.pretrain.recipes import RECIPES

    if name in RECIPES:
        model = dict(RECIPES[name]()["model"])
        preset = model.pop("preset", None)
        return GPTConfig.from_preset(preset, **model) if preset else GPTConfig.from_dict(model)
    if name in PRESETS:
        return GPTConfig.from_preset(name)
    return None


def load_for_decoding(path: str | Path, *, device: str = "cpu", dtype: str = "float32",
                      backend: str = "sdpa") -> "GPT":
    """The GPT behind `path` (any model argument, `resolve_model_dir`) on `device`, its
    weights in `dtype` ('float32' or 'bfloat16', `minigpt.device.decode_dtype`), ready to
    decode: bfloat16 weights on a CPU are laid out once for oneDNN where it has bfloat16
    (`ops.pack_for_decoding`: the same tokens, products about twice as fast, the copies as big
    as the weights; not on a CPU with AVX2 alone, where the products run in float32).

    Raises ValueError for another dtype, FileNotFoundError (listing where it looked) when
    `path` holds no model, and what `GPT.from_pretrained` raises for a bad folder."""
    from minigpt import ops
    from minigpt.device import decode_dtype
    from minigpt.model import GPT

    model = GPT.from_pretrained(resolve_model_dir(path), backend=backend).to(device, decode_dtype(dtype))
    ops.pack_for_decoding(model)
    return model
