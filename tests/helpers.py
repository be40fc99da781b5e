"""Small builders shared by the tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from minigpt.pretrain.corpora import CORPUS_DIR

DATA = Path(os.environ.get("MINIGPT_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")).resolve()
TIKTOKEN_CACHE = DATA / "tiktoken_cache"
SHAKESPEARE = CORPUS_DIR / "tinyshakespeare.txt"
"""The tiny Shakespeare that ships with minigpt (byte for byte ../shared/data/tinyshakespeare/input.txt)."""


def need_file(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"test data {path} is absent (see ../shared/data/README.md)")
    return path


def use_tiktoken_cache(monkeypatch) -> None:
    need_file(TIKTOKEN_CACHE)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Give every parameter random values (LayerNorm gains around 1), so parity tests
    exercise every tensor and greedy decoding does not collapse onto one token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_gain = name.endswith("weight") and p.dim() == 1
            p.copy_(noise + 1.0 if is_gain else noise)
    return model
