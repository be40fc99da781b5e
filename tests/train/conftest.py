"""Fixtures for the training tests: char-level tiny Shakespeare, prepared once per session."""
from __future__ import annotations

import pytest

from minigpt.pretrain import PrepareConfig, prepare
from tests.helpers import SHAKESPEARE, need_file


@pytest.fixture(scope="session")
def shakespeare_chars(tmp_path_factory):
    """A prepared folder: tiny Shakespeare, char tokenizer, nanoGPT's 90/10 split."""
    out = tmp_path_factory.mktemp("shakespeare_chars")
    prepare(PrepareConfig(inputs=(str(need_file(SHAKESPEARE)),), out_dir=str(out), tokenizer="char", progress=False))
    return out



@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine a second
    spinning thread slows each step many times over. The previous setting is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
