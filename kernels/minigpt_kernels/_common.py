"""Launcher helpers shared by the kernel files: device checks and output allocation.

Nothing here launches a kernel; these are the checks every launcher runs once at
its boundary, written once so that the error messages stay the same everywhere.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import re

import torch
import triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Set KERNELS_POISON=1 to fill every buffer a launcher allocates with NaN before
# the kernel runs, so that an element the kernel forgot to write fails a test
# instead of silently holding whatever the allocator handed back.
POISON_ENV = "KERNELS_POISON"


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as '3.6.0' or '2.5.0rc1'."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run these kernels with the installed packages, or None.

    Triton 3.6 and older turn the interpreter's one-element arrays into Python ints with
    ``int(array)``, which NumPy 2.4 and newer refuse ("only 0-dimensional arrays can be converted"):
    every kernel with a loop over tiles then fails deep inside the interpreter. Triton 3.7
    converts with ``int(array.squeeze())``. (numpy is read from its metadata, not imported.)
    """
    try:
        numpy_version = importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        return None
    if _release(triton.__version__) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run with NumPy "
                f"{numpy_version}: it converts one-element arrays with int(), which NumPy 2.4 and newer refuse. "
                f"Install numpy<2.4 or triton>=3.7, or run the kernels on a CUDA device")
    return None


def check_device(name: str, t: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``t`` lives where a Triton kernel can run.

    CUDA tensors always qualify; CPU tensors only under Triton's interpreter, and
    ``RuntimeError`` when the installed Triton and NumPy cannot run that interpreter.
    """
    if t.is_cuda:
        return
    if t.device.type == "cpu" and interpreter_enabled():
        problem = interpreter_problem()
        if problem is not None:
            raise RuntimeError(problem)
        return
    raise ValueError(
        f"{name} is on device {t.device}, but the Triton kernels run on CUDA devices, or on CPU "
        f"only under Triton's interpreter (set TRITON_INTERPRET=1 before importing minigpt_kernels); "
        f"move {name} to a CUDA device or use the reference implementation in minigpt_kernels.reference"
    )


def check_dtype(name: str, t: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``t`` has a dtype the kernels support."""
    if t.dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise ValueError(f"{name}.dtype={t.dtype} is not supported; use one of {supported}")


def poison_enabled() -> bool:
    """True when launchers should fill fresh outputs with NaN (see ``POISON_ENV``)."""
    return os.environ.get(POISON_ENV, "0") == "1"


def new_buffer(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, strides: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Allocate an uninitialised buffer (contiguous, or with ``strides``), NaN-filled when poisoning is on."""
    if strides is None:
        buf = torch.empty(shape, dtype=dtype, device=device)
    else:
        buf = torch.empty_strided(shape, strides, dtype=dtype, device=device)
    if poison_enabled():
        buf.fill_(float("nan"))
    return buf
