"""keep_freed_memory (minigpt.train.host_memory): while it is open, a large block freed and
allocated again step after step is not faulted in from the kernel again; without it
(glibc's behaviour, checked too, so that the test can tell the two apart) every page is,
every step. The training loop holds it open on a CPU while it trains."""
from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt.train.host_memory import keep_freed_memory

PAGES = 64 * 2**20 // 4096


def _transparent_huge_pages_always() -> bool:
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return setting.exists() and "[always]" in setting.read_text()


pytestmark = [
    pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                       reason="mallopt's thresholds are glibc's"),
    pytest.mark.skipif(_transparent_huge_pages_always(),
                       reason="with transparent huge pages always on, a fault maps 2 MiB, not the 4 KiB counted here"),
]


def faults_per_reallocation() -> int:
    """Page faults of a 64 MiB block (above glibc's largest dynamic mmap threshold, 32 MiB)
    allocated, filled and freed, as a training step does with its activations, averaged
    over three repeats after three more."""
    for step in range(6):
        if step == 3:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(16 * 2**20)
        del block
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3


FRESH_PROCESS = """
import sys
import torch
from minigpt.train.host_memory import keep_freed_memory
from tests.train.test_host_memory import faults_per_reallocation
if sys.argv[1] == "default":
    print(faults_per_reallocation())
else:
    with keep_freed_memory(torch.device("cpu")) as kept:
        print(faults_per_reallocation() if kept else -1)
"""


def faults_in_a_fresh_process(mode: str) -> int:
    """In a process of its own: glibc's state in this one depends on what ran before."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, mode], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_a_freed_block_is_reused_without_page_faults_while_kept():
    assert faults_in_a_fresh_process("default") > PAGES // 2  # glibc gives the block back, faults it in again
    assert 0 <= faults_in_a_fresh_process("keep") < PAGES // 20


def test_nothing_is_kept_off_the_cpu():
    with keep_freed_memory(torch.device("meta")) as kept:
        assert not kept


def test_training_on_the_cpu_keeps_freed_memory_while_it_trains(tmp_path):
    from minigpt import GPT
    from minigpt.train import train
    from minigpt.train.loop import language_model_loss
    from tests.train.common import quick_train_config, tiny_gpt_config
    from tests.train.test_loss_weighting import SplitBatches

    seen = []

    def loss_fn(model, batch):
        seen.append(faults_per_reallocation())
        return language_model_loss(model, batch)

    train(GPT(tiny_gpt_config(n_embd=16, block_size=16)), quick_train_config(tmp_path, max_steps=2), SplitBatches(False, 4),
          loss_fn=loss_fn)
    # Outside the setting every call faults its 64 MiB in (above glibc's largest mmap threshold),
    # so a call without faults shows it was in force while the loop trained.
    assert seen and min(seen) < PAGES // 20
