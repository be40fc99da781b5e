"""The one seam between the model and its compute backends: only this module knows them.

Three attention backends agree within stated tolerances:

- ``math``: the readable reference, an explicit masked softmax (and the only path that
  can return attention probabilities);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``;
- ``triton``: the fused kernels in the standalone ``minigpt_kernels`` package, ``kernels/`` (attention and
  LayerNorm). Triton needs CUDA, or ``TRITON_INTERPRET=1`` on a CPU; otherwise the
  model falls back to ``sdpa`` and says so once in the log.

Each attention call decides once which of them computes it (``attention_implementation``).
Masks follow the house's single definition, ``minigpt.masks.visible``: query i sees key j
iff j <= i and, in a banded layer of width w, i - w < j.

A banded layer costs O(T * w) on every backend. ``triton`` visits only the key tiles
that meet the band; ``sdpa`` and ``math`` hand ``minigpt.banded`` their masked attention
step, and it scores the whole band for T <= 2w, else query blocks of b = w/2 rows against
the w + b keys each can see. No T x T mask or score matrix is built for longer sequences,
except on the ``math`` path when attention probabilities are asked for.
"""
from __future__ import annotations

import functools
import logging
import os
import weakref

import torch
import torch.nn as nn
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from minigpt import banded, cpu_decode
# Also importable from here: minigpt.counts reads the band's block rules, minigpt.attention_map the mask.
from minigpt.banded import band_block_size, scores_whole_band  # noqa: F401
from minigpt.masks import band_mask

logger = logging.getLogger(__name__)

BACKENDS = ("math", "sdpa", "triton")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; choose one of {BACKENDS}")
    return backend


class UsesBackend:
    """Marks a module whose forward calls a backend-dependent op of this file (attention,
    LayerNorm) and hands it `self.backend`. Only `use_backend` sets it on an instance."""

    backend: str = "sdpa"


def use_backend(model: nn.Module, backend: str) -> nn.Module:
    """Compute every attention and LayerNorm of `model` with `backend`; returns `model`.

    backend: 'math', 'sdpa' or 'triton' (see the module docstring). This is the one place
    that chooses it: `GPT(config, backend=...)`, `GPT.set_backend`, `GPT.from_pretrained`
    and the training loop's `parallelize` all call it. The model describes the math; how it
    is computed is applied from outside, as compile and sharding are. The choice
    lives on each `UsesBackend` module rather than in a global, so two models in one
    process may differ and `torch.compile` sees a constant attribute. Works on any module
    that holds GPTs (a classifier around its backbone).

    Raises ValueError for an unknown backend, before changing anything.
    """
    check_backend(backend)
    for module in model.modules():
        if isinstance(module, UsesBackend):
            module.backend = backend
    return model


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logger.info(message)


def _triton_usable(x: torch.Tensor) -> bool:
    if x.is_cuda:
        return True
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    _log_once("backend='triton' needs CUDA (or TRITON_INTERPRET=1 on a CPU); using the PyTorch 'sdpa' path")
    return False


def _kernels():
    try:
        import minigpt_kernels
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            f"backend='triton' needs the minigpt_kernels package (the repository's kernels/ folder) and Triton: "
            f"{err}. Install minigpt (pip install -e .), or from a checkout put its kernels/ folder on "
            f"PYTHONPATH beside the root (PYTHONPATH=.:kernels)") from err
    return minigpt_kernels


def _kernel_head_dim_ok(head_dim: int) -> bool:
    supported = _kernels().ATTENTION_HEAD_DIMS
    if head_dim in supported:
        return True
    _log_once(
        f"the Triton attention kernel supports head_dim in {supported[0]}..{supported[-1]} "
        f"(multiples of 8), not {head_dim}; using 'sdpa' for attention"
    )
    return False


def attention_implementation(backend: str, q: torch.Tensor, *, dropout: bool = False, mask: bool = False) -> str:
    """Which implementation computes one attention call asked of ``backend``: decided once per call.

    'math' and 'sdpa' compute every call they are asked. 'triton' computes a whole causal
    sequence when its kernel can; otherwise 'sdpa' does, and why is logged once: no CUDA
    (and no interpreter), a head_dim the kernel lacks, dropout in training, or an explicit
    mask (KV cache, left padding), which the kernel does not take.

    q: (B, H, T, D), the queries of the call. dropout: dropout is active (p > 0 in
    training). mask: the call attends under an explicit mask.
    """
    if backend != "triton":
        return backend
    if mask:
        _log_once("the Triton attention kernel takes no explicit mask (KV cache, left padding); "
                  "using 'sdpa' for those calls")
        return "sdpa"
    if not (_triton_usable(q) and _kernel_head_dim_ok(q.shape[-1])):
        return "sdpa"
    if dropout:
        _log_once("the Triton attention kernel has no dropout; using 'sdpa' while dropout > 0 in training")
        return "sdpa"
    return "triton"


def _attend_under_bias(implementation: str, scale: float, dropout_p: float, training: bool) -> banded.Attend:
    """attend(q, k, v, bias) on the 'math' or 'sdpa' path: attention under an additive mask
    (0 / -inf) that broadcasts over the leading dims; what ``minigpt.banded`` calls."""
    drop = dropout_p if training else 0.0

    def attend(q, k, v, bias):
        if implementation == "math":
            return _math_attention(q, k, v, bias == 0, scale, drop, training)[0]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop, scale=scale)
    return attend


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    scale: float,
    backend: str,
    start: int = 0,
    left_pad: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    block: int | None = None,
) -> torch.Tensor:
    """The O(T * w) band in query blocks (``minigpt.banded.attention``) on the 'math' or 'sdpa' path.

    q: (B, H, T, D) at positions start .. start+T-1; k, v: (B, H, S, D), S >= T, at the S
    positions that end at the last query's. Returns (B, H, T, D). Raises ValueError for any
    other backend (the band on 'triton' is the kernel's).
    """
    if backend not in ("math", "sdpa"):
        raise ValueError(f"backend={backend!r}: the blocked band runs on 'math' or 'sdpa'")
    attend = _attend_under_bias(backend, scale, dropout_p, training)
    return banded.attention(q, k, v, attend, window=window, start=start, left_pad=left_pad, block=block)


def attention_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The math path's first half: (B, H, Tq, D) @ (B, H, D, Tk) -> (B, H, Tq, Tk) float32
    scaled scores, -inf where ``mask`` (broadcastable, True = may attend) is False."""
    scores = (q @ k.transpose(-2, -1)).float() * scale
    return scores.masked_fill(~mask, float("-inf"))


def _math_attention(q, k, v, mask, scale, dropout_p, training):
    # The softmax runs in float32.
    scores = attention_scores(q, k, mask, scale)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = F.dropout(probs, p=dropout_p, training=training) @ v
    return out, probs


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None,
    scale: float,
    backend: str,
    dropout_p: float = 0.0,
    training: bool = False,
    return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal (dense or banded) self-attention over a whole sequence.

    q, k, v: (B, H, T, D). Returns (out (B, H, T, D), probs (B, H, T, T) or None);
    probabilities come only from the math path. A banded layer takes the kernel on
    'triton', else ``minigpt.banded``: the whole band for T <= 2w, query blocks beyond.
    """
    T = q.shape[-2]
    if window is not None and window >= T:
        window = None  # the band covers every causal pair
    if return_probs:
        index = torch.arange(T, device=q.device)
        return _math_attention(q, k, v, band_mask(index, index, window), scale, dropout_p, training)
    implementation = attention_implementation(backend, q, dropout=dropout_p > 0 and training)
    if implementation == "triton":
        return _kernels().attention(q, k, v, causal=True, window=window, scale=scale), None
    if window is not None and banded.scores_whole_band(T, window):
        attend = _attend_under_bias(implementation, scale, dropout_p, training)
        return banded.whole_band_attention(q, k, v, attend, window=window), None
    if window is not None:
        return banded_attention(q, k, v, window=window, scale=scale, backend=implementation,
                                dropout_p=dropout_p, training=training), None
    if implementation == "math":
        index = torch.arange(T, device=q.device)
        return _math_attention(q, k, v, band_mask(index, index, None), scale, dropout_p, training)[0], None
    drop = dropout_p if training else 0.0
    return F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True, scale=scale), None


def indexed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    start: int,
    k_index: torch.Tensor,
    window: int | None,
    left_pad: torch.Tensor | None,
    scale: float,
    backend: str,
    return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of queries at positions start .. start+T-1 to keys at ``k_index``.

    Used with the KV cache (decoding, chunked prefill) and with left-padded batches.
    q: (B, H, T, D); k, v: (B, H, S, D); k_index: (S,) absolute positions of the keys,
    which cover the positions start+T-S .. start+T-1 in any order (a banded layer's
    cache is a ring). left_pad: (B,) padding tokens at the start of each row, or None.

    A single query with no padding sees every cached key (the cache holds only those).
    A banded layer with several queries sorts its keys by position and takes the O(T * w)
    ``banded_attention``; anything else builds the (Tq, S) mask.
    """
    T, S = q.shape[-2], k.shape[-2]
    implementation = "math" if return_probs else attention_implementation(backend, q, mask=True)
    if T == 1 and left_pad is None:
        return _masked_attention(q, k, v, None, scale, implementation, return_probs)
    if window is not None and window < S and not return_probs:
        order = torch.argsort(k_index)  # (S,) the ring's slots in position order
        k, v = k[:, :, order], v[:, :, order]  # (B, H, S, D)
        return banded_attention(q, k, v, window=window, scale=scale, backend=implementation,
                                start=start, left_pad=left_pad), None
    q_index = torch.arange(start, start + T, device=q.device)
    mask = band_mask(q_index, k_index, window, left_pad)  # (T, S) or (B, 1, T, S)
    return _masked_attention(q, k, v, mask, scale, implementation, return_probs)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float,
    backend: str,
    return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with an explicit boolean mask (True = may attend), used with the KV cache
    and with padded batches. ``mask=None`` means every key is visible. The fused kernel has
    no arbitrary masks, so ``triton`` takes the ``sdpa`` path here.
    """
    implementation = "math" if return_probs else attention_implementation(backend, q, mask=True)
    return _masked_attention(q, k, v, mask, scale, implementation, return_probs)


def _masked_attention(q, k, v, mask, scale, implementation, return_probs):
    if implementation == "math":
        if mask is None:
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
        out, probs = _math_attention(q, k, v, mask, scale, 0.0, False)
        return out, (probs if return_probs else None)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None


# oneDNN has a fixed cost per call (about 12 us more than MKL's) that a matrix-vector product
# wins back only when its matrix streams from memory: a product of at most this many rows ...
GEMV_MAX_ROWS = 16
# ... with fewer weight entries than this stays with MKL (the tiny recipe's 96-wide matrices,
# which sit in cache; 384 x 384 already streams).
GEMV_MIN_WEIGHTS = 1 << 17


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, computed on a CPU by oneDNN rather than MKL (on an x86 CPU
    with AVX2 and no AVX-512, only the products that want no gradient).

    On the development VM (AMD EPYC, AVX-512) MKL's float32 GEMM runs at 145-220 GFLOP/s and
    oneDNN's at 255-520 GFLOP/s on the training step's products, and for decoding's
    matrix-vector products MKL streams the weights on one core (16-18 GB/s) where oneDNN uses
    every core (39-42 GB/s): benchmarks/NOTES.md, "oneDNN for the CPU's products". Both
    read `weight` in place, in nn.Linear's layout; the backward pass's two products go
    through oneDNN too (`_OneDnnLinear`). Sums run in another order than MKL's, so outputs
    differ from `F.linear`'s by float32 rounding (about 1e-6 relative).

    A bfloat16 weight that `pack_for_decoding` laid out for oneDNN is read in that layout
    while no gradient is wanted (same kernel, bit-identical outputs, about twice as fast).
    One float32 row by a large matrix with no gradient wanted (decoding at batch 1) goes to
    `cpu_decode.gemv`, our AVX-512 or AVX2 matrix-vector product, where it is built: about 1.27x
    oneDNN's streaming rate on the AVX-512 VM (benchmarks/NOTES.md). On a CPU whose oneDNN
    has no bfloat16 (AVX2 alone), a bfloat16 product with no gradient wanted is computed in
    float32 (`_bfloat16_in_float32`): one row by `cpu_decode.gemv` reading the weight in place,
    more rows with the weight widened to float32 first; either way rounded once to bfloat16.

    On an x86 CPU with AVX2 and no AVX-512, a product that wants a gradient (training) goes
    to F.linear: there MKL's are the faster products (`_training_products_by_mkl`).

    F.linear everywhere else: off the CPU, in other dtypes (for bfloat16 F.linear already
    calls oneDNN where oneDNN has bfloat16), for a bfloat16 product that wants a gradient,
    on tensor subclasses (DTensor), under `torch.compile` (inductor picks its own kernels),
    under a dispatch mode (torch's FLOP counter knows F.linear, not oneDNN's op) or a
    `torch.func` transform, and for a product of a few rows by a small matrix. The
    oneDNN backward is first-order: where training products go to oneDNN (AVX-512), a
    gradient of its gradient (`create_graph=True`) raises an error; take such gradients with
    `torch.func`, under which the product is F.linear's on every CPU.
    """
    if _PACKED and (packed := _packed_weight(x, weight, bias)) is not None:
        return _one_dnn(x.reshape(-1, x.shape[-1]).contiguous(), packed, bias).view(*x.shape[:-1], weight.shape[0])
    if weight.dtype == torch.bfloat16 and _bfloat16_in_float32(x, weight, bias):
        if weight.numel() >= GEMV_MIN_WEIGHTS and cpu_decode.gemv_takes(x, weight, bias):
            return cpu_decode.gemv(x, weight, bias)  # reads the bfloat16 weight in place
        wide = linear(x.float(), weight.float(), None if bias is None else bias.float())
        return wide.to(torch.bfloat16)
    wants_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    broadcast_bias = bias is not None and bias.shape != weight.shape[:1]  # oneDNN takes only an (out,) bias
    if broadcast_bias or not _one_dnn_product(x, weight, wants_grad=wants_grad):
        return F.linear(x, weight, bias)
    if not wants_grad and cpu_decode.gemv_takes(x, weight, bias):
        return cpu_decode.gemv(x, weight, bias)  # decoding's one row: streams the weight faster
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # (M, I)
    if wants_grad:
        out = _OneDnnLinear.apply(rows, weight, bias)
    else:
        out = _one_dnn(rows, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def _one_dnn(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T (+ bias) by oneDNN's inner product: a (M, K), b (N, K), either may be a
    transposed view (oneDNN reads it in that layout)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b with every product by oneDNN: forward x W^T, backward dy W (for dx) and
    dW, with x and dy passed as transposed views (oneDNN copies a transposed input itself
    where it needs to; benchmarks/NOTES.md). dW as (x^T dy)^T, handed on as a transposed
    view, where the input is no wider than the output: on GPT-2's head that order took 117
    ms where dy^T x took 226; as dy^T x where the input is wider (an MLP's down-projection),
    which there is the faster order (3.2 against 4.4 ms at 1024 x 1536 -> 384)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _one_dnn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a gradient of this gradient is refused, not silently wrong
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # (M, N)
        dx = _one_dnn(grad, weight.t()) if ctx.needs_input_grad[0] else None  # (M, K)
        dw = None
        if ctx.needs_input_grad[1]:  # (N, K)
            dw = _one_dnn(grad.t(), x.t()) if x.shape[1] > grad.shape[1] else _one_dnn(x.t(), grad.t()).t()
        db = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def _one_dnn_product(x: torch.Tensor, weight: torch.Tensor, *, wants_grad: bool) -> bool:
    """Whether `linear` computes through oneDNN (see its docstring for when it does not);
    `wants_grad`: whether autograd will ask for the product's gradient (training)."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or not _plain_eager_cpu(x, weight):
        return False
    if wants_grad and _training_products_by_mkl():
        return False
    if x.numel() <= GEMV_MAX_ROWS * x.shape[-1] and weight.numel() < GEMV_MIN_WEIGHTS:
        return False
    return True


def _bfloat16_in_float32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `linear` computes this bfloat16 product in float32: on a CPU where oneDNN has
    no bfloat16 (AVX2 without AVX-512), torch's own bfloat16 GEMM is ~4x slower than
    widening the weight to float32 (0.15 ms for a 3072 x 768 matrix) and multiplying there,
    which gives the same sums (a bfloat16 product also adds in float32) rounded once to
    bfloat16 (benchmarks/NOTES.md). Only where no gradient is wanted (decoding, evaluation):
    training keeps torch's operator and its backward."""
    if x.dtype != torch.bfloat16 or (bias is not None and bias.dtype != torch.bfloat16) or weight.dim() != 2:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return _plain_eager_cpu(x, weight) and _one_dnn_usable() and not _one_dnn_has_bfloat16()


def _plain_eager_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Plain CPU tensors, run eagerly: no compile, dispatch mode, torch.func transform, tracer,
    forward-mode AD or tensor subclass, each of which knows F.linear and not oneDNN's operator."""
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():  # inductor; FlopCounterMode, fakes
        return False
    if torch._C._are_functorch_transforms_active():  # torch.func's grad and vmap know F.linear
        return False
    if torch.jit.is_tracing() or forward_ad._current_level >= 0:  # so do the tracer and forward-mode AD
        return False
    if type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, nn.Parameter) or x.numel() == 0:
        return False
    return weight.is_contiguous() and _one_dnn_usable()


# ---- bfloat16 weights laid out once for decoding -------------------------------------------
# oneDNN's bfloat16 inner product reorders a plain (N, K) weight into its blocked layout on
# every call: for a decoding step's matrix-vector products that copy costs as much as the
# product (24-29 GB/s of weights against 39-64 GB/s prepacked on the development VM,
# benchmarks/NOTES.md). `pack_for_decoding` keeps each weight's reordered copy here, outside
# the Parameter (so pickling, deepcopy and state dicts never see it); `linear` reads it while
# the weight is unchanged and no gradient is wanted. float32 gains nothing from it (oneDNN
# reads float32 weights in place), so it is not packed.
_PACKED: dict[int, tuple] = {}
"""id(weight) -> (weakref to the weight, `_content_key` when packed, the packed copy); an
entry goes when its weight is freed (weakref.finalize), found changed, or unpacked."""


def pack_for_decoding(model: nn.Module) -> int:
    """Keep a oneDNN-laid-out copy of every bfloat16 CPU `nn.Linear` weight of `model`; the
    number of weights packed. The GPT's own layers compute through `linear`, which reads the
    copies (a plain `nn.Linear` elsewhere, such as a classifier's head, calls F.linear and
    would not: pack a GPT, as `model_dir.load_for_decoding` does).

    For decoding with bfloat16 weights on a CPU (`--dtype bfloat16`): outputs are
    bit-identical to the plain weights', the products about twice as fast. The copies take
    as much memory again as those weights. A weight changed afterwards through the tensor
    (in place, `load_state_dict`, `.to()`, a new `.data`) is read plainly again and its copy
    freed. A write the tensor's version counter cannot see (through `.data`'s own view, a
    NumPy view, a collective writing into its memory) is not noticed: call
    `unpack_for_decoding` after such writes. Weights in other dtypes or on other devices,
    inference tensors (they keep no version counter), and machines without oneDNN or without
    its bfloat16 (a CPU with AVX2 but not AVX-512) are left alone.
    """
    if not _packing_usable():
        return 0
    count = 0
    for module in model.modules():
        w = module.weight if isinstance(module, nn.Linear) else None
        if w is None or w.dtype != torch.bfloat16 or w.device.type != "cpu" or not w.is_contiguous() \
                or w.is_inference() or type(w) not in (torch.Tensor, nn.Parameter):
            continue
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
        if id(w) not in _PACKED:
            weakref.finalize(w, _PACKED.pop, id(w), None)
        _PACKED[id(w)] = (weakref.ref(w), _content_key(w), packed)
        count += 1
    return count


def unpack_for_decoding(model: nn.Module) -> int:
    """Drop the copies `pack_for_decoding` kept for `model`'s weights (freeing their memory);
    the number dropped. Products read the plain weights from then on."""
    return sum(_PACKED.pop(id(m.weight), None) is not None for m in model.modules() if isinstance(m, nn.Linear))


def _content_key(w: torch.Tensor) -> tuple:
    """What changes when a weight's content is replaced through the tensor: its storage (held
    in the key, so its address cannot come back on another tensor while the key lives), the
    view on it, and the version counter that in-place writes move."""
    return (w.untyped_storage(), w.storage_offset(), tuple(w.shape), w.stride(), w.dtype,
            None if w.is_inference() else w._version)


def _packed_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """`weight`'s packed copy when `linear` may use it (see `pack_for_decoding`), else None;
    a copy found stale is dropped."""
    entry = _PACKED.get(id(weight))
    if entry is None or entry[0]() is not weight:
        return None
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() \
            or torch._C._are_functorch_transforms_active():  # fakes and traced tensors: touch nothing
        return None
    storage, *view = entry[1]
    now = _content_key(weight)
    if now[0].data_ptr() != storage.data_ptr() or tuple(now[1:]) != tuple(view):
        _PACKED.pop(id(weight), None)  # changed since packing: the plain weight is the truth
        return None
    if x.dtype != torch.bfloat16 or (bias is not None and bias.dtype != torch.bfloat16):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return None
    return entry[2] if _plain_eager_cpu(x, weight) else None


@functools.lru_cache(maxsize=None)
def _packing_usable() -> bool:
    """Whether this torch has oneDNN and its weight reorder (inductor's freezing uses it), and
    oneDNN has bfloat16 on this CPU: the reorder raises on a CPU with AVX2 alone (most
    laptops), where nothing is packed."""
    return _one_dnn_usable() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and _one_dnn_has_bfloat16()


@functools.lru_cache(maxsize=None)
def _one_dnn_has_bfloat16() -> bool:
    """oneDNN's bfloat16 needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT on the CPU (torch's own
    check where this torch has it, else torch's AVX-512 capability)."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if supported is None:
        return torch.backends.cpu.get_cpu_capability() == "AVX512"
    return bool(supported())


@functools.lru_cache(maxsize=None)
def _training_products_by_mkl() -> bool:
    """Whether a product that wants a gradient goes to MKL (F.linear) instead of oneDNN: on an
    x86 CPU with AVX2 and no AVX-512 (measured on a Zen 3 EPYC), where MKL and oneDNN run the
    same 8-lane code and MKL's dx and dW products were 10-50 % faster on the training shapes
    measured (the 6 x 384 step at 2 threads: 63 against 82 ms over one block's twelve
    products; the main job's 2 x 96 model at 1 thread: 12.3 against 14.3 ms over one block's
    and the head's fifteen), the whole 6 x 384 step 1.02x transformers' against 0.87x
    (benchmarks/NOTES.md). oneDNN keeps what it does better there, products with no
    gradient: a few rows by a large matrix it threads over the cores (1.1-1.8x MKL's speed at
    4-32 rows). torch's capability follows the ATEN_CPU_CAPABILITY environment variable, so
    `ATEN_CPU_CAPABILITY=avx2` on an AVX-512 CPU sends training to MKL too."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


@functools.lru_cache(maxsize=None)
def _one_dnn_usable() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, backend: str
) -> torch.Tensor:
    """LayerNorm over the last dimension, fused by Triton when the backend asks for it."""
    if backend == "triton" and _triton_usable(x):
        if hasattr(x, "device_mesh"):  # a DTensor: sequence-parallel under tensor parallelism
            return _layer_norm_on_local_rows(x, weight, bias, eps)
        return _kernels().layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _layer_norm_on_local_rows(x, weight, bias, eps: float):
    """The Triton LayerNorm on this rank's rows of a sequence-sharded DTensor `x` (rows are
    normalised independently, so the local result is exact). The replicated gain and bias
    enter as local tensors whose gradients are declared partial sums (`Partial`): each rank
    saw only its rows, and DTensor adds the ranks' shares when the gradient is needed whole."""
    from torch.distributed.tensor import DTensor, Partial

    def local(p):
        return None if p is None else p.to_local(grad_placements=[Partial()] * p.device_mesh.ndim)

    y = _kernels().layer_norm(x.to_local(), local(weight), local(bias), eps)
    return DTensor.from_local(_PlainGradient.apply(y), x.device_mesh, x.placements, run_check=False)


class _PlainGradient(torch.autograd.Function):
    """The identity, whose backward hands on a plain tensor: DTensor delivers a gradient as an
    `AsyncCollectiveTensor` (a collective still in flight), whose memory a kernel launch
    cannot read until it is waited for."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        from torch.distributed._functional_collectives import AsyncCollectiveTensor

        return grad.wait() if isinstance(grad, AsyncCollectiveTensor) else grad
