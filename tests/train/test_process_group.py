"""The process group is joined and left once per run, by the entry point (`process_group`);
everything inside reads where it sits (`current`). Two real processes: test_distributed.py."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from minigpt.train import distributed as dist_


def test_without_torchrun_a_run_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with dist_.process_group("cpu") as info:
        assert info == dist_.current() == dist_.DistInfo() and not dist.is_initialized()


def test_reading_the_rank_under_torchrun_before_joining_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 .*process_group\("):
        dist_.current()


def test_a_group_joined_by_the_caller_is_left_to_the_caller(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "1")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with dist_.process_group("cpu"):
            pass
        assert dist.is_initialized()  # not torn down by a with-block that did not join it
    finally:
        dist.destroy_process_group()
