"""Checkpoints: one folder per step, written atomically; the last K and the best are kept.

    out_dir/checkpoints/
        step_0001000/
            model.safetensors   the model's state_dict (tensors shared by tying stored once)
            config.json         for a GPT, minigpt's layout: GPT.from_pretrained(folder) loads it
            trainer.pt          optimizer, grad scaler, RNG states, loader position, history
            trainer.json        step, the full train config, run metadata, last metrics (readable)
            ...                 whatever `save_model` adds (pretraining adds the tokenizer's files)
        best.json               which step folder is the best, and its metric
        latest, best            symlinks to those folders, where the OS allows them

Atomic: a checkpoint is written into a hidden temporary folder, every file is fsynced, and
the folder is renamed to its final name (rename is atomic on POSIX) before the parent is
fsynced. A crash at any moment leaves the previous checkpoints untouched and, at worst, a
hidden temporary folder that readers ignore and the next save removes. Pruning renames a
folder to a hidden `.trash-` name before deleting it, so a kill mid-delete never leaves a
half `step_*` folder that a resume could pick.

Reading a damaged file (truncated, zero bytes, bad JSON, a pickle that is not plain
tensors) raises a `BadFileError` naming the file and the reason (the shared readers'
`DamagedWeightsError` for weights, `files.read_json`'s for JSON, `CheckpointError` for the
rest), so a resume can fall back to an older checkpoint by catching that one type.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from minigpt.files import BadFileError, read_json
from minigpt.weights.common import DamagedWeightsError, load_safetensors

STATE_TAG = "minigpt-state-dict"
TRAINER_STATE = "trainer.pt"
TRAINER_INFO = "trainer.json"
MODEL_FILE = "model.safetensors"
RESUME_MODEL_FILE = "trainer_model.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_LEFTOVERS = (".tmp-*", ".old-*", ".trash-*")  # interrupted writes, replacements and prunes

logger = logging.getLogger(__name__)


class CheckpointError(BadFileError):
    """A checkpoint file is missing or cannot be read (truncated, empty, not what it should be).

    A `BadFileError`, like the shared readers' errors for weights and JSON files, so a
    resume that falls back to an older checkpoint catches `BadFileError` alone."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (skipped where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_atomically(final: Path, fill: Callable[[Path], None]) -> Path:
    """Create folder `final` by calling `fill(tmp)` on a hidden temporary folder, then renaming it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    fill(tmp)
    for path in tmp.rglob("*"):
        if path.is_file():
            _fsync_file(path)
    fsync_dir(tmp)
    if final.exists():  # saving the same step again (e.g. the best at the last step)
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def point(root: Path, name: str, target: Path) -> None:
    """Make symlink root/name -> target (relative), atomically; silently skipped where unsupported."""
    tmp = root / f".{name}.link"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(target.name, tmp)
        os.replace(tmp, root / name)
    except OSError:
        tmp.unlink(missing_ok=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and not p.is_symlink()
             and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def best_checkpoint(root: Path) -> Path | None:
    path = root / "best.json"
    if not path.is_file():
        return None
    try:
        folder = root / read_json(path, "best-checkpoint record")["dir"]
    except (ValueError, KeyError, TypeError) as err:
        logger.warning("%s cannot be read (%s); ignoring it", path, err)
        return None
    return folder if folder.is_dir() else None


def prune(root: Path, keep_last: int) -> None:
    """Delete step folders beyond the newest `keep_last`, never the best; clear leftovers.

    Each folder is first renamed to a hidden `.trash-` name (atomic), so a kill while it is
    being deleted leaves a leftover that readers ignore, never a half `step_*` folder.
    """
    best = best_checkpoint(root)
    for old in list_checkpoints(root)[:-keep_last]:
        if best is None or old.resolve() != best.resolve():
            trash = root / f".trash-{old.name}-{os.getpid()}"
            os.replace(old, trash)
            fsync_dir(root)
            shutil.rmtree(trash)
    clean_leftovers(root)


def clean_leftovers(root: Path) -> None:
    """Remove the hidden folders that interrupted saves and prunes leave behind."""
    for pattern in _LEFTOVERS:
        for stale in root.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


# Model weights ---------------------------------------------------------------------------
def save_state_dict(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors of `state`; tensors that share storage (a tied head) are stored once and
    their other names recorded as aliases in the file's metadata."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = tensor.detach().cpu().contiguous()
    save_file(tensors, path, metadata={"format": "pt", "minigpt": STATE_TAG, "aliases": json.dumps(aliases)})


def is_state_dict_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("minigpt") == STATE_TAG


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict `save_state_dict` wrote. Raises CheckpointError if it is missing and
    the shared `DamagedWeightsError` (same message as every other weights file) if it is
    not a whole safetensors file."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    state = load_safetensors(path)
    try:
        with safe_open(path, framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except (OSError, ValueError) as err:
        raise DamagedWeightsError(f"weights file {path}: its metadata cannot be read ({_first_line(err)}); "
                                  f"it is damaged. Load another checkpoint") from None
    for name, original in aliases.items():
        state[name] = state[original]
    return state


def save_model_state(model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """The default `save_model`: model.safetensors (the state_dict) and, for a GPT, a
    config.json in minigpt's layout, so `GPT.from_pretrained(folder)` and `minigpt sample
    --model folder` load the checkpoint. `state` replaces `model.state_dict()` (FSDP: the
    gathered full state of a sharded model)."""
    from minigpt.model import GPT

    save_state_dict(model.state_dict() if state is None else state, folder / MODEL_FILE)
    if isinstance(model, GPT):
        config = {"model_type": "minigpt", "config": model.config.to_dict()}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Raise ValueError listing every name and shape on which `state` and `model` disagree."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [f"{k}: checkpoint {got[k]} vs model {s}" for k, s in expected.items() if k in got and got[k] != s]
    if missing or unexpected or shapes:
        parts = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                 f"shape mismatches {shapes}" if shapes else ""]
        raise ValueError(f"checkpoint {source} does not fit the model: " + "; ".join(p for p in parts if p))


def read_trainer_info(folder: Path) -> dict:
    """trainer.json, read by the shared `files.read_json`; raises a BadFileError naming the
    file if it is missing, empty, not JSON or not a minigpt trainer.json."""
    path = folder / TRAINER_INFO
    try:
        info = read_json(path, "trainer info")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    if not isinstance(info.get("train_config"), dict):
        raise CheckpointError(f"{path} holds no 'train_config'; it is not a minigpt trainer.json or is damaged")
    return info


def read_trainer_state(folder: Path) -> dict:
    """trainer.pt, loaded with weights_only=True: tensors and plain containers, never code.

    Raises CheckpointError naming the file when it is missing, truncated, or holds other
    Python objects (refused unread: such a pickle could run code when loaded).
    """
    path = folder / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise CheckpointError(f"{path} holds Python objects other than tensors and plain containers; refused "
                                  f"for safety (loading it could run code). It was not written by minigpt's "
                                  f"loop or has been tampered with") from None
        raise CheckpointError(f"{path} cannot be unpickled ({_first_line(err)}); it is damaged") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({path.stat().st_size} bytes; {_first_line(err)}); "
                              f"it is truncated or damaged") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
