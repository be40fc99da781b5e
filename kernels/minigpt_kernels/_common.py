"""Launcher helpers shared by the kernel files: device checks and output allocation.

Nothing here launches a kernel; these are the checks every launcher runs once at
its boundary, written once so that the error messages stay the same everywhere.
"""
from __future__ import annotations

import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Set KERNELS_POISON=1 to fill every buffer a launcher allocates with NaN before
# the kernel runs, so that an element the kernel forgot to write fails a test
# instead of silently holding whatever the allocator handed back.
POISON_ENV = "KERNELS_POISON"


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(name: str, t: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``t`` lives where a Triton kernel can run.

    CUDA tensors always qualify; CPU tensors only under Triton's interpreter.
    """
    if t.is_cuda:
        return
    if t.device.type == "cpu" and interpreter_enabled():
        return
    raise ValueError(
        f"{name} is on device {t.device}, but the Triton kernels run on CUDA devices, or on CPU "
        f"only under Triton's interpreter (set TRITON_INTERPRET=1 before importing kernels); "
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
