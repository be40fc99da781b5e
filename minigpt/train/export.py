"""A checkpoint of the training loop as a model folder: `minigpt export RUN --out DIR`.

A sharded checkpoint (written by every rank of a mesh, minigpt.train.checkpoint) is read
whole in this one process and written as the Hugging Face folder of the family that
represents the model (GPT-2's or GPT-Neo's, so `transformers` loads it; minigpt's own layout
otherwise), with the tokenizer's files beside it, so that `sample`, `finetune --init`,
`eval` and `serve` read it like any other model folder. A gathered checkpoint is
re-written the same way. Consolidating needs the whole model in this process's memory
(and no GPU): that is the point of the folder.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from minigpt.train.checkpoint import (MODEL_FILE, RESUME_MODEL_FILE, SHARDED_DIR, TRAINER_INFO, TRAINER_STATE,
                                      consolidate, is_sharded, latest_checkpoint)

logger = logging.getLogger(__name__)

_TRAINER_FILES = {MODEL_FILE, RESUME_MODEL_FILE, TRAINER_STATE, TRAINER_INFO, "config.json", SHARDED_DIR}


def checkpoint_folder(source: str | Path) -> Path:
    """The checkpoint folder `source` names: itself when it holds a trainer.json, else the
    newest checkpoint of the run folder `source`. Raises ValueError naming what was looked for."""
    path = Path(source).expanduser()
    if (path / TRAINER_INFO).is_file():
        return path
    newest = latest_checkpoint(path / "checkpoints")
    if newest is None:
        raise ValueError(f"{path} is neither a checkpoint folder (one with {TRAINER_INFO}) nor a run folder with "
                         f"checkpoints/step_*; give a run folder of `minigpt train` or one of its checkpoints")
    return newest


def export_checkpoint(source: str | Path, out: str | Path) -> str:
    """Write the model of checkpoint (or run) `source` into the new folder `out`; return the
    layout written ('gpt2', 'gpt_neo' or 'minigpt'). Raises ValueError when `out` exists and
    is not empty, and the checkpoint readers' errors for a damaged checkpoint."""
    from minigpt.model import GPT
    from minigpt.weights import read_config, save_pretrained

    folder = checkpoint_folder(source)
    target = Path(out).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"--out {target} already exists and is not an empty folder; choose a new folder")
    if is_sharded(folder):
        _, config = read_config(folder)
        model = GPT(config)
        consolidate(folder, model)
    else:
        model = GPT.from_pretrained(folder)
    layout = save_pretrained(model, target)
    for extra in folder.iterdir():  # the tokenizer's files, and whatever else the run saved with its model
        if extra.name not in _TRAINER_FILES and extra.is_file():
            shutil.copy2(extra, target / extra.name)
    logger.info("exported %s (%s layout, %s parameters) to %s", folder, layout, f"{model.num_params():,}", target)
    return layout
