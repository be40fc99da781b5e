"""A run folder belongs to one run: a lock while it trains, and no silent reuse.

Two runs writing one folder corrupt each other (checkpoints of both, a truncated
metrics.jsonl, a `--resume` that continues the wrong one). So `claim(out_dir, ...)`:

- takes `out_dir/run.lock`, a JSON file with the owner's pid and host created atomically
  (written to a temporary name, then hard-linked to its final name, which fails when the
  name exists). A second run is refused while the owner lives. A lock whose pid is dead on
  this host is stale (the owner was killed): it is reported and taken over. The lock is
  removed when the run ends, also by an exception.
- refuses to start a fresh run (resume=False) in a folder that already holds one
  (metrics.jsonl, run_config.json or checkpoints/), unless `overwrite`, which renames the
  old folder to `<out_dir>.old-<time>` and says so. Nothing is deleted.
- a fresh run that fails before its first checkpoint (bad data found late, a full disk)
  leaves nothing to resume, so its files (metrics.jsonl, run_config.json) are moved into
  `<out_dir>/failed-<time>/` and said so: the corrected command into the same folder is
  not refused as "already holds a run", and nothing is deleted.

Under torchrun only rank 0 touches the folder; its verdict is shared with every rank so
they all raise the same error instead of waiting for a peer that left. One layer claims a
folder: an entry point (pretraining, fine-tuning) claims it before it writes anything and
hands the `ClaimedFolder` to the loop; the loop claims it itself only when called without one.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from minigpt.train import distributed as dist_

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
RUN_MARKERS = ("metrics.jsonl", "run_config.json", "checkpoints")
"""Files and folders whose presence means a folder holds a run."""



@dataclass(frozen=True)
class ClaimedFolder:
    """A run folder this process owns for a while (`claim`), and whether the run resumes there."""

    path: Path
    resume: bool


class RunFolderError(ValueError):
    """The run folder is in use, or holds a run that this one would clobber."""


@contextmanager
def claim(out_dir: str | Path, *, resume: bool, overwrite: bool = False,
          is_main: bool = True) -> Iterator[ClaimedFolder]:
    """Own `out_dir` for the duration of the `with` block (see the module docstring); yields
    the `ClaimedFolder` to hand to the loop (`minigpt.train.train(..., folder=...)`).

    Args:
        out_dir: the run folder; created if missing.
        resume: the run continues the one in the folder, so an existing run is expected.
        overwrite: move an existing run aside to `<out_dir>.old-<time>` instead of refusing.
        is_main: whether this process is rank 0 (the only one that touches the folder).

    Raises:
        RunFolderError: another live run holds the lock, or the folder holds a run and
            neither `resume` nor `overwrite` is set, or both are set.
    """
    key = Path(out_dir).expanduser().resolve()
    error = None
    fresh = is_main and not resume and (overwrite or not (key.is_dir() and holds_run(key)))
    if is_main:
        try:
            _acquire(key, resume, overwrite)
        except (RunFolderError, OSError) as err:  # shared, so no rank waits for a peer that left
            error = str(err) if isinstance(err, RunFolderError) else f"cannot claim run folder {key}: {err}"
    errors = [e for e in dist_.all_gather_objects(error) if e is not None]
    if errors:
        if is_main and error is None:
            _release(key)
        raise RunFolderError(errors[0])
    try:
        yield ClaimedFolder(key, resume)
    except Exception:
        if fresh:
            _set_aside_a_start_without_checkpoints(key)
        raise
    finally:
        if is_main:
            _release(key)


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_MARKERS)


def _set_aside_a_start_without_checkpoints(folder: Path) -> None:
    """Move the files of a fresh run that failed before its first checkpoint into
    folder/failed-<time>/, so the same command can start there again."""
    if any((folder / "checkpoints").glob("step_*")) or not holds_run(folder):
        return
    aside = folder / f"failed-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        aside.mkdir(exist_ok=True)
        for name in RUN_MARKERS:
            if (folder / name).exists():
                os.replace(folder / name, aside / name)
    except OSError as err:  # a full disk or a read-only folder: the run's own error says more
        logger.warning("could not move the failed run's files aside into %s (%s)", aside, err)
        return
    logger.warning("the run failed before its first checkpoint; its files are in %s, and the same command can "
                   "start again in %s", aside, folder)


def _acquire(folder: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise RunFolderError(f"resume and overwrite were both set for {folder}: --resume continues the run there, "
                             f"--overwrite moves it aside to start afresh; choose one")
    _lock(folder)
    try:
        if resume or not holds_run(folder):
            return
        if not overwrite:
            found = ", ".join(name for name in RUN_MARKERS if (folder / name).exists())
            raise RunFolderError(
                f"{folder} already holds a run ({found}); starting another there would mix the two. "
                f"Continue it with --resume (resume=True), start afresh with --overwrite (overwrite=True: the old "
                f"run is moved to {folder.name}.old-<time>, nothing is deleted), or choose another out_dir")
        aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            n += 1
            aside = aside.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        os.replace(folder, aside)
        (aside / LOCK_FILE).unlink(missing_ok=True)
    except BaseException:
        _release(folder)
        raise
    _lock(folder)  # the new, empty folder; fails if another run took the name meanwhile
    logger.warning("overwrite: moved the previous run in %s to %s", folder, aside)


def _lock(folder: Path) -> None:
    """Create folder/run.lock holding this process, taking over a stale one."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "argv": sys.argv}
    tmp = folder / f".{LOCK_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(me) + "\n")
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # atomic: fails when a lock exists, and the file is whole when it appears
                return
            except FileExistsError:
                pass
            owner = _read_lock(path)
            if owner == {}:  # released meanwhile
                continue
            if owner is not None and not _stale(owner):
                raise RunFolderError(
                    f"{folder} is in use by another run (pid {owner.get('pid')} on {owner.get('host')}, started "
                    f"{owner.get('started')}); two runs in one folder corrupt each other. Wait for it to finish, "
                    f"use another out_dir, or, if that run is gone, delete {path}")
            logger.warning("%s was left by a run that is no longer alive (%s); taking it over", path,
                           "unreadable" if owner is None else f"pid {owner.get('pid')} on {owner.get('host')}")
            try:
                os.replace(path, folder / f".{LOCK_FILE}.stale-{os.getpid()}")  # only one taker wins the rename
            except FileNotFoundError:
                continue
            (folder / f".{LOCK_FILE}.stale-{os.getpid()}").unlink(missing_ok=True)
        raise RunFolderError(f"could not take the lock {path}: other runs keep starting in {folder}")
    finally:
        tmp.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) else None
    except FileNotFoundError:
        return {}  # released meanwhile: not stale, retry the link
    except (OSError, ValueError):
        return None


def _stale(owner: dict) -> bool:
    """Whether the lock's owner is known to be dead: a pid that no longer exists on this host."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False  # another machine's process: we cannot tell
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _release(folder: Path) -> None:
    path = folder / LOCK_FILE
    owner = _read_lock(path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
