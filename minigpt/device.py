"""Checking that a requested device exists on this machine, before anything is built on it;
and what the machine is (`memory_bytes`, `describe_cpu`).

Configs only check a device's spelling (a config may be written on a laptop for a GPU
machine); the commands call `check_device` when they are about to use one, so that
``--device cuda`` without CUDA is one clear sentence, not a traceback from deep in torch.
"""
from __future__ import annotations

import os
import platform

import torch


def check_device(name: str) -> None:
    """Raise ValueError when `name` ('cpu', 'cuda', 'cuda:N', 'mps' or 'auto') is not
    available here, saying what is and which flag to use instead."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device name; use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for, but this machine has no CUDA GPU that torch can use "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                             f"use --device cpu (or device = \"cpu\" in a config)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r} does not exist: this machine has {count} CUDA GPU(s), "
                             f"cuda:0..cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} was asked for, but MPS (Apple GPU) is not available here; "
                             f"use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported; use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'")


# The dtypes a model may be run in for decoding (`--dtype` of sample and serve).
DECODE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def decode_dtype(name: str) -> torch.dtype:
    """The torch dtype named by `--dtype` ('float32' or 'bfloat16'); ValueError otherwise.

    bfloat16 halves the bytes each decoded token reads (decoding at batch 1 is bound by
    reading the weights); logits are sampled in float32 either way. Greedy tokens may then
    differ from float32's where two candidates are within bfloat16's rounding (measured over
    100 prompts in benchmarks/results/decode_cpu.md)."""
    if name not in DECODE_DTYPES:
        raise ValueError(f"dtype={name!r} is not supported for decoding; choose one of {sorted(DECODE_DTYPES)} "
                         f"(e.g. --dtype bfloat16)")
    return DECODE_DTYPES[name]


def memory_bytes(name: str) -> int | None:
    """Total memory of device `name` ('auto' means CUDA when there is one, else the CPU):
    a GPU's own memory, the machine's RAM for the CPU; None when it cannot be told.

    For up-front checks ("this cannot fit"), so it is the total, not what is free now."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        return None
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not POSIX
            return None
    return None


def describe_cpu() -> str:
    """This machine's CPU in one line, for the header of a benchmark's results: architecture,
    model name and family (from /proc/cpuinfo, where there is one), the vector instruction
    set torch's kernels use here (`torch.backends.cpu.get_cpu_capability`) and the cores,
    e.g. 'x86_64, AMD EPYC (family 25), AVX2, 2 cores'. CPU figures are only comparable
    between machines that agree on all of it: one VM name has stood for a Zen 5 with AVX-512
    and a Zen 3 with AVX2 alone, and this project's CPU paths differ between the two."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name", "")
    if model and "cpu family" in fields:
        model += f" (family {fields['cpu family']})"
    parts = [platform.machine() or "unknown architecture", model, torch.backends.cpu.get_cpu_capability(),
             f"{os.cpu_count()} cores"]
    return ", ".join(part for part in parts if part)
