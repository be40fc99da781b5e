"""Shared test set-up.

Triton decides at decoration time whether a ``@triton.jit`` function is compiled
or interpreted, so ``TRITON_INTERPRET`` must be set before ``minigpt_kernels`` is first
imported. Without CUDA we always run the kernels through Triton's interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests' models are tiny: one thread avoids thread hand-off costs that dominate them
# on a small (or busy) CPU, and makes timings of the suite steadier.
torch.set_num_threads(1)

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
