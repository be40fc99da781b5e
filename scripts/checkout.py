"""A checkout's import roots: what a process started from a checkout puts on its path.

`minigpt` sits at the root and `minigpt_kernels` in `kernels/` (a folder, not a package, so
that a checkout on `sys.path` never hides Hugging Face's `kernels`). An installed minigpt
finds both anyway; a checkout that is not installed (the GPU machine, where nothing can be
installed) needs both on the path, which is what these give a child process.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_ROOTS = (ROOT, ROOT / "kernels")


def pythonpath(*more: str | None) -> str:
    """A PYTHONPATH value: the checkout's import roots first, then the non-empty `more`."""
    return os.pathsep.join([*map(str, IMPORT_ROOTS), *filter(None, more)])


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default: this process's) whose PYTHONPATH starts with the checkout."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = pythonpath(env.get("PYTHONPATH"))
    return env
