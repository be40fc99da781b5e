"""keep_freed_memory (minigpt.train.host_memory): after it, a large block freed and
allocated again step after step is not faulted in from the kernel again; without it
(glibc's default, checked too, so the test can tell the two apart) every page is, every step."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from minigpt.train.host_memory import keep_freed_memory

REALLOCATE = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from minigpt.train.host_memory import keep_freed_memory
    assert keep_freed_memory()
for step in range(6):  # as a training step does: the same large block allocated, filled and freed
    if step == 3:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(16 * 2**20)  # 64 MiB, above glibc's largest dynamic mmap threshold (32 MiB)
    del block
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""
PAGES = 64 * 2**20 // 4096

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt's thresholds are glibc's")


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", REALLOCATE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@glibc
def test_a_freed_block_is_reused_without_page_faults():
    assert page_faults("default") > PAGES // 2  # glibc gave the block back and faults it in again
    assert page_faults("keep") < PAGES // 20


@glibc
def test_training_on_the_cpu_keeps_freed_memory(tmp_path):
    from minigpt import GPT
    from minigpt.train import train
    from tests.train.common import quick_train_config, tiny_gpt_config
    from tests.train.test_loss_weighting import SplitBatches

    keep_freed_memory.cache_clear()
    train(GPT(tiny_gpt_config(n_embd=16, block_size=16)), quick_train_config(tmp_path, max_steps=1), SplitBatches(False, 4))
    assert keep_freed_memory.cache_info().currsize == 1
