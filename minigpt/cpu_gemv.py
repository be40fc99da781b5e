"""A float32 matrix-vector product of our own for decoding on a CPU (`cpu_gemv.c`).

Why: at batch 1 a decoding step is one pass over the weights, so its speed is the speed at
which the products stream them. oneDNN's float32 inner product streams 33.6 GB/s over GPT-2
124M's per-token products with 2 threads (22.6 with 1) on the development VM, where a plain
AVX-512 loop of four rows at a time over OpenMP threads streams 42.3 (33.0): the same bytes in
about 0.78x the time (benchmarks/NOTES.md). torch offers no other float32 GEMV on a CPU, so
this is the one kernel in C; `ops.linear` calls it for one row by a large float32 matrix
while no gradient is wanted, and falls back to oneDNN wherever it is not available.

The C file ships with the package and is compiled on first use by the C compiler (`$CC`, else
`cc`) into a cache folder (`$XDG_CACHE_HOME/minigpt`, else `~/.cache/minigpt`), keyed by the
source and flags, then loaded with ctypes (which releases the GIL during the call). No
compiler, no AVX-512, a failed build, or `MINIGPT_CPU_GEMV=0`: `available()` is False and
nothing changes. The sums run in another order than oneDNN's, so outputs differ by float32
rounding; tests compare both against float64.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_gemv.c")
FLAGS = ("-O3", "-mavx512f", "-mfma", "-fopenmp", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "minigpt"


def _build() -> Path:
    """Compile cpu_gemv.c once per source and flags; concurrent builders each write their own
    temporary file and rename it into place, so a reader never sees half a library."""
    compiler = shlex.split(os.environ.get("CC") or "cc")  # "ccache gcc" is a compiler too
    if not compiler or shutil.which(compiler[0]) is None:
        raise RuntimeError(f"no C compiler {os.environ.get('CC') or 'cc'!r} on PATH")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((*compiler, *FLAGS)).encode()).hexdigest()[:16]
    folder = _cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"cpu_gemv-{key}.so"
    if target.exists():
        return target
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        try:
            done = subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", str(partial)], capture_output=True,
                                  text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(compiler)} took over {BUILD_TIMEOUT_S} s") from None
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed: {done.stderr.strip()[-500:]}")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("MINIGPT_CPU_GEMV", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None
    try:
        library = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError) as error:
        log.info("minigpt's CPU matrix-vector product is off (%s); oneDNN computes it", error)
        return None
    library.minigpt_gemv_f32.restype = None
    library.minigpt_gemv_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return library


def available() -> bool:
    """Whether `gemv` can run here (built and loaded on the first call)."""
    return _library() is not None


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (in,) or (1, in) float32 times weight (out, in)^T, plus bias (out,): (out,) or (1, out).

    float32 CPU tensors, the weight contiguous, the bias (out,) and contiguous (the caller,
    `ops.linear`, checks); raises RuntimeError where `available()` is False."""
    library = _library()
    if library is None:
        raise RuntimeError("minigpt's CPU matrix-vector product is not available here; use F.linear")
    out_features, in_features = weight.shape
    x = x.contiguous()
    if x.numel() != in_features or (bias is not None and tuple(bias.shape) != (out_features,)):
        raise ValueError(f"gemv takes one row of {in_features} values and a bias of {out_features}; got x "
                         f"{tuple(x.shape)}, bias {None if bias is None else tuple(bias.shape)}")
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.float32, device="cpu")  # whatever the default device
    library.minigpt_gemv_f32(weight.data_ptr(), x.data_ptr(), bias.data_ptr() if bias is not None else None,
                             y.data_ptr(), out_features, in_features, torch.get_num_threads())
    return y
