"""keep_freed_memory (minigpt.train.host_memory): while it is open, a large block freed and
allocated again step after step is not faulted in from the kernel again; outside it
(glibc's behaviour, checked too, so that the test can tell the two apart) every page is,
every step. The training loop holds it open on a CPU, and only while it trains."""
from __future__ import annotations

import platform
import resource
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


def test_a_freed_block_is_reused_without_page_faults_while_kept():
    assert faults_per_reallocation() > PAGES // 2  # glibc gives the block back and faults it in again
    with keep_freed_memory(torch.device("cpu")) as kept:
        assert kept
        assert faults_per_reallocation() < PAGES // 20
    assert faults_per_reallocation() > PAGES // 2  # the thresholds are glibc's again


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
    assert seen and max(seen) < PAGES // 20
    assert faults_per_reallocation() > PAGES // 2
