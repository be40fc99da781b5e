"""Decoding at batch 1 on an x86-64 CPU with AVX-512 or AVX2, in C (`cpu_decode.c`): a
matrix-vector product (float32 or bfloat16 weights), and a whole pre-norm block for one token.

Why: at batch 1 a decoding step is one pass over the weights. oneDNN's float32 inner product
streams 33.6 GB/s over GPT-2 124M's per-token products with 2 threads (22.6 with 1) on the
development VM, where a plain AVX-512 loop of four rows at a time over OpenMP threads streams
42.3 (33.0): `gemv`, which `ops.linear` calls for one row by a large float32 matrix while no
gradient is wanted (and for bfloat16 where oneDNN has no bfloat16: a CPU with AVX2 alone).
With the products at the memory's speed, what is left of a token is the block's ~20 small
torch operators between them, about 0.2 ms per block, most of it Python
reading objects that the weights have pushed out of the cache. `BlockPlan.step` does a whole
block in one call, and `minigpt.model.Block` takes it for one token of one row whenever
nothing could tell the difference (no hook, no gradient, plain float32 or bfloat16 weights;
with bfloat16 the block computes in float32 between the values it reads and those it stores,
so it is closer to float64 than torch's bfloat16 operators are). torch offers neither
(`torch.compile` of the decoding step was slower: benchmarks/NOTES.md).

The C file ships with the package and is compiled on first use by the C compiler (`$CC`, else
`cc`) for the instruction set torch itself runs here: AVX-512 where torch reports "AVX512",
AVX2 with FMA where it reports "AVX2" (most laptops, and CPUs such as AMD's before Zen 4). It
goes into a cache folder (`$XDG_CACHE_HOME/minigpt`, else `~/.cache/minigpt`), keyed by the
source and flags, and is loaded with ctypes (which releases the GIL during the call). No
compiler, neither instruction set, a failed build, or `MINIGPT_CPU_DECODE=0` (or the older
`MINIGPT_CPU_GEMV=0`): `available()` is False and torch computes everything, as before. The
sums run in another order than torch's, so outputs differ by float32 rounding; tests compare
both against float64.
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

SOURCE = Path(__file__).with_name("cpu_decode.c")
WEIGHTS = ("ln1_w", "ln1_b", "qkv_w", "qkv_b", "attn_proj_w", "attn_proj_b",
           "ln2_w", "ln2_b", "fc_w", "fc_b", "mlp_proj_w", "mlp_proj_b")
"""A block's tensors in `BlockPlan`'s order (a bias may be None)."""
ACTIVATIONS = {"gelu": 1, "gelu_tanh": 2}
"""GPTConfig.activation -> the C file's code for it."""


class BlockShape(ctypes.Structure):
    """cpu_decode.c's `MinigptBlock`: the block's weights (NULL for a missing bias) and shape."""

    _fields_ = ([(name, ctypes.c_void_p) for name in WEIGHTS]
                + [(name, ctypes.c_int64) for name in ("n_embd", "n_head", "mlp_width", "activation", "bf16")]
                + [("eps", ctypes.c_float), ("scale", ctypes.c_float)])


COMMON_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
ISA_FLAGS = {"AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"), "AVX2": ("-mavx2", "-mfma")}
"""torch's CPU capability -> the instruction sets cpu_decode.c is compiled for. torch's
"AVX512" requires AVX-512 F, BW, VL and DQ; its "AVX2", AVX2 and FMA."""
BUILD_TIMEOUT_S = 120


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "minigpt"


def _build(isa: str) -> Path:
    """Compile cpu_decode.c once per source and flags for `isa` (a key of ISA_FLAGS);
    concurrent builders each write their own temporary file and rename it into place, so a
    reader never sees half a library."""
    flags = (*COMMON_FLAGS, *ISA_FLAGS[isa])
    compiler = shlex.split(os.environ.get("CC") or "cc")  # "ccache gcc" is a compiler too
    if not compiler or shutil.which(compiler[0]) is None:
        raise RuntimeError(f"no C compiler {os.environ.get('CC') or 'cc'!r} on PATH")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((*compiler, *flags)).encode()).hexdigest()[:16]
    folder = _cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"cpu_decode-{key}.so"
    if target.exists():
        return target
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        try:
            done = subprocess.run([*compiler, *flags, str(SOURCE), "-o", str(partial)], capture_output=True,
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
    if "0" in (os.environ.get("MINIGPT_CPU_DECODE"), os.environ.get("MINIGPT_CPU_GEMV")):
        return None
    isa = torch.backends.cpu.get_cpu_capability()
    if isa not in ISA_FLAGS:
        return None
    try:
        library = ctypes.CDLL(str(_build(isa)))
    except (OSError, RuntimeError) as error:
        log.info("minigpt's CPU decoding kernels are off (%s); torch computes everything", error)
        return None
    library.minigpt_gemv.restype = None
    library.minigpt_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    library.minigpt_decode_block.restype = None
    library.minigpt_decode_block.argtypes = ([ctypes.POINTER(BlockShape)] + [ctypes.c_void_p] * 4
                                             + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int])
    return library


def available() -> bool:
    """Whether `gemv` and `BlockPlan.step` can run here (built and loaded on the first call)."""
    return _library() is not None


DTYPES = (torch.float32, torch.bfloat16)
"""What a block's tensors (all of them the same) and gemv's weight may be."""


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (in,) or (1, in) times weight (out, in)^T, plus bias (out,): (out,) or (1, out).

    What it takes is what `gemv_takes` accepts; anything else raises ValueError saying why.
    The sums run in float32 (a bfloat16 weight is widened exactly as it is read, x is taken in
    float32) and the result is rounded once to the weight's dtype, as torch's bfloat16
    product rounds it. Raises RuntimeError where `available()` is False."""
    library = _library()
    if library is None:
        raise RuntimeError("minigpt's CPU matrix-vector product is not available here; use F.linear")
    if not _shapes_fit(x, weight, bias):
        raise ValueError(f"gemv takes one row of {weight.shape[-1]} values, a float32 or bfloat16 weight and a bias "
                         f"of {weight.shape[0]} in the weight's dtype; got x {tuple(x.shape)}, weight "
                         f"{weight.dtype}, bias {None if bias is None else (tuple(bias.shape), bias.dtype)}")
    if not _in_place(weight, bias):
        raise ValueError("gemv reads the weight and bias in place: they must be plain contiguous CPU tensors; "
                         f"got weight strides {weight.stride()} on {weight.device}")
    out_features, in_features = weight.shape
    x = x.to(torch.float32).contiguous()
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.float32, device="cpu")  # whatever the default device
    library.minigpt_gemv(weight.data_ptr(), x.data_ptr(), bias.data_ptr() if bias is not None else None,
                         y.data_ptr(), out_features, in_features, torch.get_num_threads(), weight.dtype == torch.bfloat16)
    return y if weight.dtype == torch.float32 else y.to(weight.dtype)


def gemv_takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `gemv` can compute this product here: it is built (`available()`), and it takes
    these tensors: one row of the weight's width on the CPU (any float dtype), a plain
    contiguous float32 or bfloat16 CPU weight (out, in), and a bias (out,) of the weight's
    dtype, plain and contiguous, or none. `ops.linear` asks this before it sends a product
    to gemv."""
    return _shapes_fit(x, weight, bias) and _in_place(weight, bias) and available()


def _shapes_fit(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if weight.dim() != 2 or weight.dtype not in DTYPES:
        return False
    out_features, in_features = weight.shape
    return x.numel() == in_features and x.shape[-1] == in_features and x.device.type == "cpu" \
        and (bias is None or (tuple(bias.shape) == (out_features,) and bias.dtype == weight.dtype))


def _in_place(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return _plain(weight, weight.dtype) and (bias is None or _plain(bias, weight.dtype))


def _plain(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == dtype and t.device.type == "cpu" \
        and t.is_contiguous()


class BlockPlan:
    """One block's weights checked once and handed to C as a struct, for `step` to compute the
    block for one token after another (building the struct is most of a block's Python cost).

    weights: the 12 tensors of `WEIGHTS` (a bias may be None); n_head, eps, scale and
    activation as in GPTConfig. Raises ValueError for shapes that do not fit together; check
    `usable(weights)` first, which is False where a tensor is not a plain contiguous CPU tensor
    (all float32, or all bfloat16: in between, everything is computed in float32). A
    plan keeps the weights' addresses: `matches` says whether they are still the
    block's (a `.data` swap, `.to()` or a replaced Parameter moves them).
    """

    def __init__(self, weights: tuple[torch.Tensor | None, ...], *, n_head: int, eps: float, scale: float,
                 activation: str) -> None:
        missing = [WEIGHTS[i] for i in range(0, len(WEIGHTS), 2) if weights[i] is None]
        if len(weights) != len(WEIGHTS) or missing:
            raise ValueError(f"BlockPlan takes the {len(WEIGHTS)} tensors {WEIGHTS}, only biases may be None; "
                             f"got {len(weights)}, missing {missing}")
        qkv, fc = weights[2], weights[8]
        C, F = qkv.shape[1], fc.shape[0]
        expected = {0: (C,), 1: (C,), 2: (3 * C, C), 3: (3 * C,), 4: (C, C), 5: (C,),
                    6: (C,), 7: (C,), 8: (F, C), 9: (F,), 10: (C, F), 11: (C,)}
        wrong = [f"{WEIGHTS[i]} {tuple(w.shape)} (expected {expected[i]})" for i, w in enumerate(weights)
                 if w is not None and tuple(w.shape) != expected[i]]
        if wrong or C % n_head or activation not in ACTIVATIONS:
            raise ValueError(f"BlockPlan cannot take this block: {', '.join(wrong) or 'shapes fit'}; n_embd {C}, "
                             f"n_head {n_head}, activation {activation!r} (one of {sorted(ACTIVATIONS)})")
        self.weights = weights
        self.addresses = tuple(w.data_ptr() if w is not None else 0 for w in weights)
        self.n_embd, self.n_head, self.mlp_width, self.dtype = C, n_head, F, weights[0].dtype
        self.shape = BlockShape(*(w.data_ptr() if w is not None else None for w in weights), C, n_head, F,
                                ACTIVATIONS[activation], self.dtype == torch.bfloat16, eps, scale)

    @staticmethod
    def usable(weights: tuple[torch.Tensor | None, ...]) -> bool:
        """Whether C can read these tensors: plain contiguous CPU tensors, all float32 or all
        bfloat16, and built here."""
        first = weights[0]
        if any(weights[i] is None for i in range(0, len(WEIGHTS), 2)):  # only a bias may be missing
            return False
        return first.dtype in DTYPES and available() and all(w is None or _plain(w, first.dtype) for w in weights)

    def matches(self, weights: tuple[torch.Tensor | None, ...]) -> bool:
        """Whether `weights` are this plan's tensors, at the addresses and in the dtype it holds."""
        dtype = self.dtype
        return all(a is b for a, b in zip(weights, self.weights)) and all(
            w is None or (w.data_ptr() == address and w.dtype == dtype) for w, address in zip(weights, self.addresses))

    def step(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: int, count: int) -> torch.Tensor | None:
        """The block for one token: x + attn(ln_1(x)), then + mlp(ln_2(.)), as
        `minigpt.model.Block` computes it. x: (C,) or (1, 1, C), of the weights' dtype (as is
        the result); k, v: the layer's cache (1,
        n_head, capacity, head_dim), into whose slot `slot` the token's key and value are
        written; the query sees slots 0..count-1, every one of them. Returns a new tensor shaped
        like x, or None where x or the cache is not plain and contiguous on the CPU in the
        weights' dtype (the caller takes torch's path). Raises ValueError for shapes that do not fit the plan."""
        if not (_plain(x, self.dtype) and _plain(k, self.dtype) and _plain(v, self.dtype)):
            return None
        C, H = self.n_embd, self.n_head
        capacity = k.shape[2]
        if x.numel() != C or k.shape != v.shape or tuple(k.shape) != (1, H, capacity, C // H) \
                or not 0 <= slot < capacity or not 0 < count <= capacity:
            raise ValueError(f"BlockPlan.step: x {tuple(x.shape)}, cache {tuple(k.shape)}, slot {slot} and count {count} "
                             f"do not fit a block of n_embd {C} with {H} heads (cache (1, {H}, capacity, {C // H}), "
                             f"0 <= slot < capacity, 0 < count <= capacity)")
        out = torch.empty(x.shape, dtype=self.dtype, device="cpu")
        scratch = torch.empty(7 * C + self.mlp_width + H * capacity, dtype=torch.float32, device="cpu")
        _library().minigpt_decode_block(ctypes.byref(self.shape), x.data_ptr(), out.data_ptr(), k.data_ptr(),
                                        v.data_ptr(), capacity, slot, count, scratch.data_ptr(),
                                        torch.get_num_threads())
        return out
