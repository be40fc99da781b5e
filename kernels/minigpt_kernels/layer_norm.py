"""Fused LayerNorm in Triton, forward and backward, plus an ``nn.LayerNorm`` drop-in.

    y = (x - mean) * rstd * w + b,   mean = sum(x) / N,  rstd = 1 / sqrt(sum((x - mean)^2) / N + eps)

over the last dim of width N (Ba et al. 2016). Statistics are computed and saved in
float32 whatever the input dtype. The backward, with xhat = (x - mean) * rstd and
g = w * dy, is

    dx = rstd * (g - mean(g) - xhat * mean(xhat * g))
    dw = sum_rows dy * xhat,    db = sum_rows dy

dx is per row. dw and db are sums over rows: each program adds up its own group of
rows into a float32 partial row, and a second kernel sums the partials in a fixed
order, so the result is deterministic (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from minigpt_kernels._common import check_device, check_dtype, new_buffer

# A row lives in registers as one tile; past this many bytes per row it would spill.
MAX_ROW_BYTES = 65536


@triton.jit
def _layer_norm_fwd_kernel(
    X_ptr, W_ptr, B_ptr, Y_ptr, Mean_ptr, Rstd_ptr,
    stride_xm, stride_xn, stride_ym,
    n_rows, n_cols, eps,
    HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program normalises BLOCK_ROWS whole rows, each held as one tile of BLOCK_N >= N:
    #   mean = sum(x)/N, var = sum((x-mean)^2)/N, y = (x-mean) * rstd * w + b
    # and saves mean and rstd = 1/sqrt(var + eps) (float32) for the backward.
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(X_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xn,
                mask=mask, other=0.0).to(tl.float32)  # (BLOCK_ROWS, BLOCK_N)
    mean = tl.sum(x, 1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)  # centred; zero in the padding columns
    var = tl.sum(xc * xc, 1) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)

    w = tl.load(W_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        b = tl.load(B_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y_ptr + rows64[:, None] * stride_ym + cols[None, :], y.to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(Mean_ptr + rows, mean, mask=row_ok)
    tl.store(Rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_dx_kernel(
    X_ptr, W_ptr, dY_ptr, Mean_ptr, Rstd_ptr, dX_ptr, dW_partial_ptr, dB_partial_ptr,
    stride_xm, stride_xn, stride_dym, stride_dyn, stride_dxm,
    n_rows, n_cols, rows_per_program,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program handles the rows [pid * rows_per_program, +rows_per_program), one at a time:
    #   dx = rstd * (g - mean(g) - xhat * mean(xhat * g)),  g = w * dy
    # and writes its partial sums of dy * xhat (for dw) and dy (for db) to row pid
    # of the (n_programs, N) float32 partial buffers.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)

    row_start = pid * rows_per_program
    n_own = min(rows_per_program, n_rows - row_start)
    X_ptr += row_start.to(tl.int64) * stride_xm
    dY_ptr += row_start.to(tl.int64) * stride_dym
    dX_ptr += row_start.to(tl.int64) * stride_dxm
    Mean_ptr += row_start
    Rstd_ptr += row_start
    for r in range(0, n_own):
        x = tl.load(X_ptr + r * stride_xm + cols * stride_xn, mask=col_ok, other=0.0).to(tl.float32)
        dy = tl.load(dY_ptr + r * stride_dym + cols * stride_dyn, mask=col_ok, other=0.0).to(tl.float32)
        mean = tl.load(Mean_ptr + r)
        rstd = tl.load(Rstd_ptr + r)
        xhat = tl.where(col_ok, (x - mean) * rstd, 0.0)
        g = w * dy  # zero in the padding columns, since w and dy load as 0 there
        c_xhat = tl.sum(xhat * g, 0) / n_cols
        c_mean = tl.sum(g, 0) / n_cols
        dx = (g - c_mean - xhat * c_xhat) * rstd
        tl.store(dX_ptr + r * stride_dxm + cols, dx.to(dX_ptr.dtype.element_ty), mask=col_ok)
        dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy

    partial_offs = pid.to(tl.int64) * n_cols + cols
    tl.store(dW_partial_ptr + partial_offs, dw_acc, mask=col_ok)
    if HAS_BIAS:
        tl.store(dB_partial_ptr + partial_offs, db_acc, mask=col_ok)


@triton.jit
def _layer_norm_bwd_dx_wide_kernel(
    X_ptr, W_ptr, dY_ptr, Mean_ptr, Rstd_ptr, dX_ptr, dW_partial_ptr, dB_partial_ptr,
    stride_xm, stride_xn, stride_dym, stride_dyn, stride_dxm,
    n_rows, n_cols, rows_per_program,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The same result as _layer_norm_bwd_dx_kernel for rows too wide to hold in registers
    # (above WIDE_ROW: x, dy, w and the dw/db sums of a 16384-wide row spill on sm_90).
    # Each row is read in column chunks of BLOCK_N, twice: the first pass sums
    # xhat * g and g for the two means, the second writes dx and adds dy * xhat and dy to
    # this program's row of the partial buffers (which it alone owns, so the sums stay
    # deterministic).
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    n_own = min(rows_per_program, n_rows - row_start)
    X_ptr += row_start.to(tl.int64) * stride_xm
    dY_ptr += row_start.to(tl.int64) * stride_dym
    dX_ptr += row_start.to(tl.int64) * stride_dxm
    Mean_ptr += row_start
    Rstd_ptr += row_start
    partial_row = pid.to(tl.int64) * n_cols
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        tl.store(dW_partial_ptr + partial_row + cols, tl.zeros([BLOCK_N], dtype=tl.float32), mask=col_ok)
        if HAS_BIAS:
            tl.store(dB_partial_ptr + partial_row + cols, tl.zeros([BLOCK_N], dtype=tl.float32), mask=col_ok)
    for r in range(0, n_own):
        mean = tl.load(Mean_ptr + r)
        rstd = tl.load(Rstd_ptr + r)
        sum_xhat_g = 0.0
        sum_g = 0.0
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < n_cols
            x = tl.load(X_ptr + r * stride_xm + cols * stride_xn, mask=col_ok, other=0.0).to(tl.float32)
            dy = tl.load(dY_ptr + r * stride_dym + cols * stride_dyn, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(W_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            xhat = tl.where(col_ok, (x - mean) * rstd, 0.0)
            g = w * dy
            sum_xhat_g += tl.sum(xhat * g, 0)
            sum_g += tl.sum(g, 0)
        c_xhat = sum_xhat_g / n_cols
        c_mean = sum_g / n_cols
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < n_cols
            x = tl.load(X_ptr + r * stride_xm + cols * stride_xn, mask=col_ok, other=0.0).to(tl.float32)
            dy = tl.load(dY_ptr + r * stride_dym + cols * stride_dyn, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(W_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            xhat = tl.where(col_ok, (x - mean) * rstd, 0.0)
            dx = (w * dy - c_mean - xhat * c_xhat) * rstd
            tl.store(dX_ptr + r * stride_dxm + cols, dx.to(dX_ptr.dtype.element_ty), mask=col_ok)
            dw_ptrs = dW_partial_ptr + partial_row + cols
            tl.store(dw_ptrs, tl.load(dw_ptrs, mask=col_ok, other=0.0) + dy * xhat, mask=col_ok)
            if HAS_BIAS:
                db_ptrs = dB_partial_ptr + partial_row + cols
                tl.store(db_ptrs, tl.load(db_ptrs, mask=col_ok, other=0.0) + dy, mask=col_ok)


@triton.jit
def _layer_norm_bwd_dwdb_kernel(
    dW_partial_ptr, dB_partial_ptr, dW_ptr, dB_ptr,
    n_partials, n_cols,
    HAS_BIAS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program sums BLOCK_N columns of the (n_partials, N) partial buffers over
    # their rows, always in the same order:  dw[c] = sum_g dW_partial[g, c]  (same for db).
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_g in range(0, n_partials, BLOCK_G):
        offs_g = start_g + tl.arange(0, BLOCK_G)
        mask = (offs_g < n_partials)[:, None] & col_ok[None, :]
        offs = offs_g.to(tl.int64)[:, None] * n_cols + cols[None, :]
        dw += tl.sum(tl.load(dW_partial_ptr + offs, mask=mask, other=0.0), 0)
        if HAS_BIAS:
            db += tl.sum(tl.load(dB_partial_ptr + offs, mask=mask, other=0.0), 0)
    tl.store(dW_ptr + cols, dw.to(dW_ptr.dtype.element_ty), mask=col_ok)
    if HAS_BIAS:
        tl.store(dB_ptr + cols, db.to(dB_ptr.dtype.element_ty), mask=col_ok)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


# Rows wider than this take the two-pass, column-chunked backward
# (_layer_norm_bwd_dx_wide_kernel, chunks of WIDE_ROW_CHUNK): holding a whole 16384-wide
# row in registers spills on sm_90 (ptxas -v, scripts/compile_table.py). 12288 is gpt3-175b's.
WIDE_ROW = 8192
WIDE_ROW_CHUNK = 4096
# 8 warps (16 elements a thread), not the 16 that _num_warps gives a 4096-wide chunk: with 16
# warps Triton 3.6 (the lent GPU machine's) caps the wide kernel at 64 registers and spills 4
# bytes in fp16/bf16; with 8 it takes 127 registers and spills none under 3.6 or 3.9.
WIDE_ROW_WARPS = 8


def max_width(dtype: torch.dtype) -> int:
    """Widest row the kernels accept for ``dtype`` (16384 for float32, 32768 for 16-bit)."""
    return MAX_ROW_BYTES // torch.empty((), dtype=dtype).element_size()


def _num_warps(tile_elems: int) -> int:
    # About 8 elements per thread (a few 16-byte vectors), between 1 and 16 warps.
    return min(max(tile_elems // 256, 1), 16)


def bwd_dx_launch(n_cols: int) -> tuple[triton.JITFunction, int, int]:
    """(kernel, BLOCK_N, num_warps) of the backward dx pass for rows of ``n_cols``: the whole
    row in one tile up to WIDE_ROW, column chunks of WIDE_ROW_CHUNK above it."""
    if n_cols > WIDE_ROW:
        return _layer_norm_bwd_dx_wide_kernel, WIDE_ROW_CHUNK, WIDE_ROW_WARPS
    block_n = triton.next_power_of_2(n_cols)
    return _layer_norm_bwd_dx_kernel, block_n, _num_warps(block_n)


def _check_layer_norm_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError("x must be a tensor with at least one dim; layer_norm normalises the last dim")
    check_device("x", x)
    check_dtype("x", x)
    n = x.shape[-1]
    if n == 0 or x.numel() == 0:
        raise ValueError(f"x.shape={tuple(x.shape)} is empty; layer_norm needs at least one element per row")
    if n > max_width(x.dtype):
        raise ValueError(
            f"x.shape[-1]={n} exceeds the widest row this kernel holds in registers for {x.dtype} "
            f"({max_width(x.dtype)}); use minigpt_kernels.reference.layer_norm_reference or torch.nn.functional.layer_norm"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None and name == "bias":
            continue
        if not isinstance(p, torch.Tensor) or p.shape != (n,):
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"{name} has shape {shape}; expected ({n},) to match x.shape[-1]={n}")
        check_dtype(name, p)
        if p.device != x.device:
            raise ValueError(f"{name}.device={p.device} must equal x.device={x.device}")
        if p.stride(0) != 1:
            raise ValueError(f"{name} has stride {p.stride(0)}; it must be contiguous, e.g. {name}.contiguous()")


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    # (..., N) -> (rows, N) without a copy, or a clear error.
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        raise ValueError(
            f"x with shape {tuple(x.shape)} and strides {x.stride()} cannot be viewed as "
            f"(rows, {x.shape[-1]}) without a copy; pass x.contiguous()"
        ) from None


def _layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate, allocate and launch the forward kernel. Returns (y, mean, rstd).

    y is shaped like x in x.dtype; mean and rstd are (rows,) float32.
    """
    _check_layer_norm_inputs(x, weight, bias)
    x2 = _rows_view(x)  # (rows, N)
    n_rows, n_cols = x2.shape
    y = new_buffer((n_rows, n_cols), x.dtype, x.device)
    mean = new_buffer((n_rows,), torch.float32, x.device)
    rstd = new_buffer((n_rows,), torch.float32, x.device)
    block_n = triton.next_power_of_2(n_cols)
    block_rows = min(max(4096 // block_n, 1), 16)  # several narrow rows per program
    _layer_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
        x2, weight, bias if bias is not None else weight, y, mean, rstd,
        x2.stride(0), x2.stride(1), y.stride(0),
        n_rows, n_cols, float(eps),
        HAS_BIAS=bias is not None, BLOCK_ROWS=block_rows, BLOCK_N=block_n,
        num_warps=_num_warps(block_rows * block_n),
    )
    return y.view(x.shape), mean, rstd


def _num_partials(n_rows: int, device: torch.device) -> int:
    # Enough programs to fill the GPU a few times over; few under the interpreter,
    # where programs run one after another anyway (and each handles several rows).
    if device.type == "cuda":
        return min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, 4)


def _layer_norm_bwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    mean: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernels. Returns (dx, dweight, dbias or None)."""
    x2 = _rows_view(x)
    n_rows, n_cols = x2.shape
    # Autograd hands over dy in whatever layout the next op produced. Any row and
    # column strides are passed through; only leading dims that cannot be merged
    # (e.g. a permuted gradient) force reshape to copy, since there is no other option here.
    dy2 = dy.reshape(n_rows, n_cols)
    dx = new_buffer((n_rows, n_cols), x.dtype, x.device)

    rows_per_program = triton.cdiv(n_rows, _num_partials(n_rows, x.device))
    n_partials = triton.cdiv(n_rows, rows_per_program)
    dw_partial = new_buffer((n_partials, n_cols), torch.float32, x.device)
    db_partial = new_buffer((n_partials, n_cols), torch.float32, x.device) if bias is not None else dw_partial
    kernel, block_n, num_warps = bwd_dx_launch(n_cols)
    kernel[(n_partials,)](
        x2, weight, dy2, mean, rstd, dx, dw_partial, db_partial,
        x2.stride(0), x2.stride(1), dy2.stride(0), dy2.stride(1), dx.stride(0),
        n_rows, n_cols, rows_per_program,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, num_warps=num_warps,
    )

    dw = new_buffer((n_cols,), weight.dtype, x.device)
    db = new_buffer((n_cols,), bias.dtype, x.device) if bias is not None else None
    reduce_block_n = 128
    _layer_norm_bwd_dwdb_kernel[(triton.cdiv(n_cols, reduce_block_n),)](
        dw_partial, db_partial, dw, db if db is not None else dw,
        n_partials, n_cols,
        HAS_BIAS=bias is not None, BLOCK_G=32, BLOCK_N=reduce_block_n, num_warps=4,
    )
    return dx.view(x.shape), dw, db


# ---------------------------------------------------------------------------
# Autograd and public API
# ---------------------------------------------------------------------------


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
    ) -> torch.Tensor:
        y, mean, rstd = _layer_norm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = _layer_norm_bwd(x, weight, bias, mean, rstd, dy)
        return dx, dw, db, None


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """Fused LayerNorm over the last dim, differentiable in x, weight and bias.

    Args:
        x: (..., N) tensor, float32, float16 or bfloat16, on CUDA (CPU only under
            ``TRITON_INTERPRET=1``). Its leading dims must merge into rows without a
            copy (true for any contiguous tensor); the last dim may have any stride.
        weight: (N,) scale, contiguous; any supported float dtype.
        bias: (N,) shift, or None.
        eps: added to the variance.

    Returns:
        Tensor shaped like x in x.dtype. Mean and rstd are computed in float32.

    Raises:
        ValueError: on an unsupported device or dtype, an empty x, N above
            ``max_width(x.dtype)``, mismatched weight/bias shapes or devices, or an x
            whose leading dims cannot be merged without a copy.
    """
    return _LayerNormFunction.apply(x, weight, bias, eps)


class LayerNorm(nn.Module):
    """Drop-in for ``torch.nn.LayerNorm(normalized_shape, eps, bias=...)`` using the fused kernel.

    Parameters are named ``weight`` and ``bias`` like torch's, so state dicts load
    either way. Only a single normalised (last) dim and an elementwise affine are
    supported.
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int],
        eps: float = 1e-5,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if len(shape) != 1:
            raise ValueError(
                f"normalized_shape={normalized_shape} must be one int; this LayerNorm normalises the last dim only"
            )
        self.normalized_shape = shape
        self.eps = eps
        self.elementwise_affine = True
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, bias={self.bias is not None}"
