"""One progress bar for long work outside the training loop (evaluation, scoring, generation)."""
from __future__ import annotations

from collections.abc import Iterable


def progress_bar(items: Iterable, total: int, desc: str, unit: str = "batch"):
    """A tqdm bar over `items` on an interactive terminal only (disable=None), so a long
    evaluation shows progress while pipes, logs and tests stay quiet."""
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit, disable=None, leave=False, dynamic_ncols=True)
