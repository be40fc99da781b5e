"""The one tolerance table for kernel-vs-reference comparisons, keyed by dtype.

Kernels are compared with a float64 reference computed from the same (possibly
low-precision) inputs, by relative error in the Frobenius norm:

    ||actual - expected|| / ||expected|| <= REL_TOL[dtype]

float32 kernels accumulate in float32 and land near 1e-7; the budget of 1e-4
leaves room for long reductions. float16 and bfloat16 kernels round their
inputs to matrix units and their outputs to the storage dtype (bfloat16 keeps
8 mantissa bits, about 4e-3 per element), so they get 1e-2.
"""
from __future__ import annotations

import math

import torch

REL_TOL = {
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}

# Muon's weights after a few updates against a float64 restatement, by absolute error: four
# updates of lr 0.01 move a weight by about 0.005 (at most ~0.02); the Newton-Schulz
# iteration's own rounding leaves ~1e-7 of that in float32 and up to ~2.3e-4 in bfloat16
# (8 mantissa bits), so these bounds keep 100x and 4x room.
NEWTON_SCHULZ_ATOL = {
    torch.float32: 1e-5,
    torch.bfloat16: 1e-3,
}

# When the expected tensor is (nearly) all zeros, e.g. dQ at T=1 (a softmax over one
# key has zero gradient) or dx at width 1, a relative error is meaningless. The norm
# we divide by is then at least ZERO_FLOOR * sqrt(numel): the actual tensor must be
# zero to within an RMS of REL_TOL * ZERO_FLOOR. Test inputs are O(1), so this floor
# never loosens a comparison against a tensor of ordinary size.
ZERO_FLOOR = 1e-2


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / max(||expected||, ZERO_FLOOR * sqrt(numel)), in float64."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    denom = max(e.norm().item(), ZERO_FLOOR * math.sqrt(max(e.numel(), 1)))
    return (a - e).norm().item() / denom


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "tensor") -> None:
    """Assert shapes match, ``actual`` is finite everywhere, and the relative error is within REL_TOL[dtype].

    NaN never passes, so an output element the kernel forgot to write (poisoned
    with NaN, see ``minigpt_kernels._common.POISON_ENV``) fails here.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite = torch.isfinite(actual)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int((~finite).sum())} non-finite elements, first at {bad}")
    err = rel_error(actual, expected)
    tol = REL_TOL[dtype]
    assert err <= tol, f"{name}: relative error {err:.3e} exceeds {tol:.0e} for {dtype}"


# The flash-attention error rule (as in the FlashAttention test-suite, Dao et al.): a fused
# kernel may be at most FLASH_FACTOR times as far from a float64 reference as PyTorch's
# plain computation in the same dtype, plus a small absolute slack, in max-abs error. The
# slack covers outputs whose same-dtype error is exactly zero (e.g. dQ at T=1, where the
# kernel's delta = rowsum(dO * O) and dP cancel only to rounding): about 100 float32 ulps,
# or one float16/bfloat16 ulp, at magnitude 1.
FLASH_FACTOR = 2.0
FLASH_SLACK = {
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected|, in float64."""
    return (actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs().max().item()


def assert_flash_close(
    actual: torch.Tensor, expected: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype, name: str = "tensor"
) -> None:
    """Assert ``actual`` (the kernel) is finite and within the flash-attention error rule.

    ``expected`` is the float64 reference; ``baseline`` is PyTorch's computation of the
    same thing in ``dtype``.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert bool(torch.isfinite(actual).all()), f"{name}: non-finite elements"
    err, base = max_abs_error(actual, expected), max_abs_error(baseline, expected)
    bound = FLASH_FACTOR * base + FLASH_SLACK[dtype]
    assert err <= bound, f"{name}: max error {err:.3e} > {FLASH_FACTOR} x PyTorch's {base:.3e} + {FLASH_SLACK[dtype]:.0e}"
