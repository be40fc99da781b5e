"""Kernel-test set-up: poison every launcher-allocated buffer with NaN.

An element a kernel forgets to write then stays NaN, and ``assert_rel_close``
(tests/tolerances.py) rejects it.
"""
import pytest

from minigpt_kernels._common import POISON_ENV


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(POISON_ENV, "1")
