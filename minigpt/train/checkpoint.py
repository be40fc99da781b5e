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

A sharded checkpoint (train.checkpoint_format, the default under tensor parallelism) holds
`sharded/` instead of model.safetensors: torch.distributed.checkpoint's files, one per rank
with that rank's shards of the model and optimizer state plus `.metadata`, written by every
rank at once (no rank gathers the whole model), under the single-device parameter names, so
that a job on another mesh loads it (DCP reshards on load). `consolidate` reads it back
whole in one process; `minigpt export` makes a model folder of it. The ranks must share the
file system the run folder is on.

Atomic (`minigpt.files.write_atomically`): a checkpoint is written into a hidden temporary
folder, every file is fsynced, and the folder is renamed to its final name (rename is
atomic on POSIX) before the parent is fsynced. A crash at any moment leaves the previous checkpoints untouched and, at worst, a
hidden temporary folder that readers ignore and the next save removes. Pruning renames a
folder to a hidden `.trash-` name before deleting it, so a kill mid-delete never leaves a
half `step_*` folder that a resume could pick.

Reading a damaged file (truncated, zero bytes, bad JSON, a pickle that is not plain
tensors) raises a `BadFileError` naming the file and the reason (the shared readers'
`DamagedWeightsError` for weights, `files.read_json`'s for JSON, `CheckpointError` for the
rest), so a resume can fall back to an older checkpoint by catching that one type.

The loop's side (end of this file) is one object, `Checkpointer`: built once per run with
where the checkpoints live and what each holds besides the model, it `find`s the newest
checkpoint that loads, `load`s it into the run (model, optimizer, scaler, RNG states from
`minigpt.train.rng`, loader position, counters) and `save`s a step; `check_same_run`
refuses a checkpoint of another config.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from minigpt.files import (BadFileError, DamagedWeightsError, fsync_dir, load_safetensors, point, read_json,
                           write_atomically, write_json_atomically)
from minigpt.train import distributed as dist_
from minigpt.train.config import RESUMABLE_FIELDS, TrainConfig
from minigpt.train.rng import rng_state, seed_rngs, set_rng_state

if TYPE_CHECKING:
    from minigpt.train.state import Run

STATE_TAG = "minigpt-state-dict"
TRAINER_STATE = "trainer.pt"
TRAINER_INFO = "trainer.json"
MODEL_FILE = "model.safetensors"
RESUME_MODEL_FILE = "trainer_model.safetensors"
SHARDED_DIR = "sharded"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_LEFTOVERS = (".tmp-*", ".old-*", ".trash-*")  # interrupted writes, replacements and prunes

logger = logging.getLogger(__name__)


class CheckpointError(BadFileError):
    """A checkpoint file is missing or cannot be read (truncated, empty, not what it should be).

    A `BadFileError`, like the shared readers' errors for weights and JSON files, so a
    resume that falls back to an older checkpoint catches `BadFileError` alone."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


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
    their other names recorded as aliases in the file's metadata.

    Not `safetensors.torch.save_model`/`load_model`: those drop a tied name on saving and need
    the model to put it back on loading, while a checkpoint is also read without a model (a
    sharded run consolidated, a state checked before it is loaded); the aliases let
    `load_state_dict_file` return every name by itself."""
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
    save_state_dict(model.state_dict() if state is None else state, folder / MODEL_FILE)
    save_model_config(model, folder)


def read_model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The trained model's state_dict in gathered checkpoint `folder`: the loop's own copy
    (trainer_model.safetensors) when `save_model` wrote another layout, else model.safetensors.
    Raises as `load_state_dict_file` does."""
    own = folder / RESUME_MODEL_FILE
    return load_state_dict_file(own if own.is_file() else folder / MODEL_FILE)


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


# The loop's state in a checkpoint: the same-run check, saving and loading.

def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_new_model_field_default(key: str, value) -> bool:
    """Whether `key` ('model.<field>') is a GPTConfig field whose value is its default: a
    checkpoint written before the field existed behaved that way."""
    from minigpt.config import GPTConfig

    field = {f.name: f for f in dataclasses.fields(GPTConfig)}.get(key.removeprefix("model."))
    return field is not None and field.default is not dataclasses.MISSING and value == field.default


def check_same_run(folder: Path, info: dict, config: TrainConfig, run_metadata: dict | None) -> None:
    """Resuming: the checkpoint's config must agree with this run's (RESUMABLE_FIELDS aside)."""
    # A field added to TrainConfig after the checkpoint was written had its default then.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    saved = {k: v for k, v in {**defaults, **info["train_config"]}.items() if k not in RESUMABLE_FIELDS}
    now = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_FIELDS}
    diffs = [f"train.{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    old, new = _flat(info.get("run_metadata") or {}), _flat(json.loads(json.dumps(run_metadata or {})))
    old = {**{k: v for k, v in new.items() if k.startswith("model.") and k not in old
              and _is_new_model_field_default(k, v)}, **old}
    diffs += [f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}"
              for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diffs:
        raise ValueError(
            f"cannot resume from {folder}: its config differs from this run's: " + "; ".join(diffs)
            + f". Use the original settings, or a new out_dir to start afresh (fields that may change: "
            f"{', '.join(sorted(RESUMABLE_FIELDS))})"
        )


class Checkpointer:
    """A run's checkpoints (see the module docstring): `find`, `load`, `save`, `best`.

    Args:
        root: the checkpoints folder (out_dir/checkpoints).
        config: the run's TrainConfig (saved in every checkpoint; `keep_last`, the format).
        info: where this process sits (only rank 0 writes the folder; every rank writes shards).
        run_metadata: JSON-able facts about the run (model config, data), saved with every
            checkpoint and compared on resume.
        checkpoint_files: small text files written into every checkpoint (name -> text),
            e.g. the tokenizer.
        save_model: writes the model into a checkpoint folder in a layout of the caller's;
            the default writes its state_dict and, for a GPT, config.json. When the folder
            it writes lacks that state_dict, trainer_model.safetensors is added to resume from.
    """

    def __init__(self, root: Path, config: TrainConfig, info: dist_.DistInfo, run_metadata: dict | None = None,
                 checkpoint_files: dict[str, str] | None = None,
                 save_model: Callable[[nn.Module, Path], None] | None = None) -> None:
        self.root, self.config, self.info = Path(root), config, info
        self.run_metadata, self.checkpoint_files, self.save_model = run_metadata, checkpoint_files, save_model

    def find(self, model: nn.Module) -> tuple[Path | None, dict | None]:
        """(folder, its contents) of the newest checkpoint under `root` that reads whole.

        A damaged checkpoint (a truncated or empty file, bad trainer.json, a refused pickle) is
        skipped with a warning naming the file; the older ones are exact states too, so the run
        continues as if it had been interrupted there. A checkpoint that reads but does not fit
        this run (another config or shapes) is an error, not skipped. Raises ValueError listing
        every checkpoint tried when none reads.
        """
        root, info = self.root, self.info
        found = list_checkpoints(root)
        tried = []
        for folder in reversed(found):
            try:
                return folder, _read_checkpoint(folder, model, self.config, self.run_metadata)
            except BadFileError as err:  # CheckpointError, DamagedWeightsError, files.read_json's
                tried.append(f"{folder.name}: {err}")
                if info.is_main:
                    logger.warning("cannot resume from %s: %s; trying the previous checkpoint", folder, err)
        if found:
            raise ValueError(
                f"cannot resume from {root}: none of its {len(found)} checkpoints loads ("
                + "; ".join(tried) + "). Restore a checkpoint from a backup, or start afresh with --overwrite "
                "(the old run is moved aside) or another out_dir")
        return None, None

    def load(self, saved: dict, run: Run) -> None:
        """Put what `find` read into `run`: model, optimizer, scaler, loader, RNGs, counters."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        from minigpt.train.parallel import split_qkv, split_qkv_optimizer

        raw, optimizer, scaler, info = run.raw, run.optimizer, run.scaler, run.info
        model_state, trainer = saved["model"], saved["trainer"]
        # A gathered optimizer state is keyed by parameter name on the mesh path (under the
        # single-device names) and by position in one process or under DDP.
        by_name = any(isinstance(p, str) for group in (trainer["optimizer"] or {}).get("param_groups", [])
                      for p in group["params"])
        options = StateDictOptions(full_state_dict=True)
        if model_state is None:  # sharded: every rank reads its shards, resharded to this run's mesh
            _load_shards(run, saved["folder"])
        elif run.parallel == "fsdp":
            if not by_name:
                raise ValueError(f"{saved['folder']} was written by a run in one process or under DDP, whose "
                                 f"optimizer state is by position; resume it the same way (without a mesh), or "
                                 f"start the mesh run from its weights with a fresh optimizer")
            names = raw.state_dict().keys()
            set_model_state_dict(raw, split_qkv(model_state, names), options=options)
            set_optimizer_state_dict(raw, optimizer, split_qkv_optimizer(trainer["optimizer"], names), options=options)
        else:
            raw.load_state_dict(model_state)
            if by_name:  # written on the mesh path, resumed in one process or under DDP
                set_optimizer_state_dict(raw, optimizer, trainer["optimizer"], options=options)
            else:
                optimizer.load_state_dict(trainer["optimizer"])
        if scaler is not None and trainer.get("scaler") is not None:
            scaler.load_state_dict(trainer["scaler"])
        run.batches.load_state_dict(trainer["loader"])
        rng = trainer["rng"]
        if len(rng) == info.world_size:
            set_rng_state(rng[info.rank])
        else:  # another world size: no saved stream is this rank's, so each rank gets its own
            if info.is_main:
                logger.warning("the checkpoint was written by %d ranks and this run has %d: each rank's random "
                               "stream (dropout) is seeded afresh from the seed, the step and the rank, so the "
                               "run continues, but not bit for bit as the uninterrupted one would", len(rng),
                               info.world_size)
            seed_rngs(self.config.seed + 1_000_003 * trainer["step"] + info.rank)
        run.state.load(trainer["loop"])

    def save(self, run: Run, best: bool) -> Path:
        """Write the step checkpoint of `run` (model, optimizer, scaler, RNGs, loader, counters)
        atomically; point 'latest' (and 'best' when `best`) at it and prune. Returns its folder."""
        from minigpt.train.parallel import fuse_qkv, fuse_qkv_optimizer

        raw, optimizer, scaler, state, config, info = run.raw, run.optimizer, run.scaler, run.state, run.config, run.info
        root, save_model = self.root, self.save_model
        rng = dist_.all_gather_objects(rng_state())  # every rank's dropout RNG, for exact resumption
        folder = step_dir(root, state.step)
        model_state, optim_state, shards = None, None, None
        if self.writes_sharded(run):
            shards = _save_shards(run, folder)
        elif run.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = fuse_qkv(get_model_state_dict(raw, options=options))  # the single-device names
            optim_state = fuse_qkv_optimizer(get_optimizer_state_dict(raw, optimizer, options=options))
        else:
            optim_state = optimizer.state_dict()
        if info.is_main:
            def fill(tmp: Path) -> None:
                if shards is not None:  # every rank's files, moved in whole
                    os.replace(shards, tmp / SHARDED_DIR)
                    save_model_config(raw, tmp)
                elif model_state is not None:  # FSDP: the gathered full state, with config.json like any GPT
                    save_model_state(raw, tmp, model_state)
                elif save_model is not None:
                    save_model(raw, tmp)
                else:
                    save_model_state(raw, tmp)
                if shards is None and not is_state_dict_file(tmp / MODEL_FILE):
                    save_state_dict(raw.state_dict(), tmp / RESUME_MODEL_FILE)
                for name, text in (self.checkpoint_files or {}).items():
                    (tmp / name).write_text(text)
                torch.save({
                    "step": state.step, "loop": state.to_dict(), "optimizer": optim_state,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": rng, "loader": run.batches.state_dict(), "world_size": info.world_size,
                }, tmp / TRAINER_STATE)
                readable = {"step": state.step, "train_config": config.to_dict(), "run_metadata": self.run_metadata,
                            "world_size": info.world_size, "mesh": None if run.mesh is None else str(run.mesh),
                            "last_eval": state.evals[-1] if state.evals else None,
                            "best": {"metric": config.best_metric, "value": state.best, "step": state.best_step}}
                (tmp / TRAINER_INFO).write_text(json.dumps(readable, indent=2) + "\n")

            write_atomically(folder, fill)
            if best:
                write_json_atomically(root / "best.json", {"dir": folder.name, "step": state.step,
                                                           "metric": config.best_metric, "value": state.best})
                point(root, "best", folder)
            point(root, "latest", folder)
            prune(root, config.keep_last)
        dist_.barrier()
        return folder

    def best(self) -> Path | None:
        return best_checkpoint(self.root)

    def clean_leftovers(self) -> None:
        """Remove what interrupted saves left (rank 0, at the start of a run)."""
        if self.info.is_main and self.root.is_dir():
            clean_leftovers(self.root)

    def writes_sharded(self, run: Run) -> bool:
        """Whether `run` saves sharded checkpoints (train.checkpoint_format; 'auto' is sharded
        under tensor parallelism)."""
        fmt = self.config.checkpoint_format
        return fmt == "sharded" or (fmt == "auto" and run.mesh is not None and run.mesh.tp > 1)


def _save_shards(run: Run, folder: Path) -> Path:
    """Every rank writes its shards of the model and optimizer state (DCP) into one hidden
    folder beside `folder`, which rank 0 then moves into the checkpoint (`Checkpointer.save`):
    a kill before that rename leaves only a leftover that the next start removes."""
    import torch.distributed.checkpoint as dcp

    shards = folder.parent / f".tmp-{folder.name}-shards"
    if run.info.is_main:
        shutil.rmtree(shards, ignore_errors=True)
        shards.mkdir(parents=True)
    dist_.barrier()
    dcp.save(_distributed_state(run), checkpoint_id=shards)
    return shards


def _distributed_state(run: Run) -> dict:
    """{"model": ..., "optimizer": ...} of `run` as DCP saves and loads them: each rank's
    shards, keyed by parameter name (the split qkv's names; `consolidate` fuses them)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(run.raw),
            "optimizer": get_optimizer_state_dict(run.raw, run.optimizer)}


def save_model_config(model: nn.Module, folder: Path) -> None:
    """config.json in minigpt's layout, for a GPT (what `save_model_state` writes beside the weights)."""
    from minigpt.model import GPT

    if isinstance(model, GPT):
        config = {"model_type": "minigpt", "config": model.config.to_dict()}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def is_sharded(folder: Path) -> bool:
    """Whether checkpoint `folder` holds its model as DCP shards (see the module docstring)."""
    return (folder / SHARDED_DIR).is_dir()


def consolidate(folder: Path, model: nn.Module) -> None:
    """Fill `model` (built whole, e.g. on the CPU from the folder's config.json) from the
    sharded checkpoint `folder`, in this one process: the inverse of every rank's save.
    Raises CheckpointError when the shards are missing or incomplete."""
    import torch.distributed.checkpoint as dcp

    from minigpt.train.parallel import split_fused_qkv

    metadata = folder / SHARDED_DIR / ".metadata"
    if not metadata.is_file():
        raise CheckpointError(f"{metadata} is missing; the sharded checkpoint {folder} is incomplete")
    split_fused_qkv(model)  # the names the shards were saved under
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=folder / SHARDED_DIR, no_dist=True)
    except Exception as err:  # DCP raises its own types for a missing or cut-short shard file
        raise CheckpointError(f"the sharded checkpoint {folder} cannot be read ({_first_line(err)}); it is "
                              f"damaged or incomplete") from None
    _fuse_in_place(model)


def _fuse_in_place(model: nn.Module) -> None:
    """Put each `QKVColumns` of `model` back as the fused projection (the model's `Linear`) it came from."""
    from minigpt.model import CausalSelfAttention, Linear
    from minigpt.train.parallel import QKVColumns

    for module in model.modules():
        if isinstance(module, CausalSelfAttention) and isinstance(module.qkv, QKVColumns):
            split = module.qkv
            fused = Linear(split.q.in_features, 3 * split.q.out_features, bias=split.q.bias is not None)
            with torch.no_grad():
                fused.weight.copy_(split.weight)
                if split.q.bias is not None:
                    fused.bias.copy_(split.bias)
            module.qkv = fused


def _read_checkpoint(folder: Path, model: nn.Module, config: TrainConfig, run_metadata: dict | None) -> dict:
    """Read and check everything in `folder` before anything is changed, so a damaged file
    (a BadFileError) leaves the model, optimizer and loader as they were."""
    saved = read_trainer_info(folder)
    check_same_run(folder, saved, config, run_metadata)
    if is_sharded(folder):  # read by every rank at once, later (`Checkpointer.load`)
        _check_shards(folder / SHARDED_DIR)
        model_state = None
    else:
        model_state = read_model_state(folder)
        check_state_dict(model, model_state, folder)
    trainer = read_trainer_state(folder)
    for key in ("loop", "optimizer", "rng", "loader"):
        if key not in trainer:
            raise CheckpointError(f"{folder / TRAINER_STATE} has no {key!r} entry; it is damaged")
    return {"model": model_state, "trainer": trainer, "folder": folder}


def _check_shards(shards: Path) -> None:
    """Raise CheckpointError unless `shards` holds DCP's .metadata and every byte range it
    lists, so that a resume falls back to an older checkpoint rather than failing in the load."""
    import torch.distributed.checkpoint as dcp

    if not (shards / ".metadata").is_file():
        raise CheckpointError(f"{shards / '.metadata'} is missing; the sharded checkpoint is incomplete")
    try:
        metadata = dcp.FileSystemReader(str(shards)).read_metadata()
    except Exception as err:  # DCP's own types for a cut-short or foreign file
        raise CheckpointError(f"{shards / '.metadata'} cannot be read ({_first_line(err)}); it is damaged") from None
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = shards / name
        if not path.is_file() or path.stat().st_size < size:
            have = path.stat().st_size if path.is_file() else "no"
            raise CheckpointError(f"{path} holds {have} bytes of the {size} the checkpoint's .metadata lists; "
                                  f"the shard is missing or cut short")


def _load_shards(run: Run, folder: Path) -> None:
    """Load the sharded checkpoint `folder` into `run` on any mesh (DCP reshards on load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if run.parallel != "fsdp":
        raise ValueError(f"{folder} is a sharded checkpoint; resume it under torchrun on the mesh path "
                         f"(train.parallel='fsdp' or a mesh degree, any mesh), or make a model folder of it with "
                         f"`minigpt export {folder} --out DIR` and fine-tune or sample from that")
    state = _distributed_state(run)
    dcp.load(state, checkpoint_id=folder / SHARDED_DIR)
    set_model_state_dict(run.raw, state["model"])
    set_optimizer_state_dict(run.raw, run.optimizer, state["optimizer"])


