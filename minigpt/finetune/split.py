"""Holding out validation rows: a stratified, seeded split that keeps repeated rows on one
side, and a count of validation rows that also occur in training. Both tasks' rows go
through here (labeled rows grouped by text, prompt/completion pairs by prompt)."""
from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)


def stratified_split(examples: Sequence, val_fraction: float, seed: int = 1337,
                     key: Callable = lambda e: e.label, group: Callable | None = None) -> tuple[list, list]:
    """Split into (train, validation) keeping each label's share, reproducibly for a seed.

    Each label contributes round(n_label * val_fraction) rows to validation (at least one
    when it has two or more rows), chosen by a seeded shuffle; both parts keep file order.
    With `group` (e.g. the text), rows with the same group key are one unit that goes to
    one side whole: duplicates never land in both train and validation, where the held-out
    score would measure memory. A group counts under its first row's label.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    members: dict = {}  # group key -> indices; a row is its own group without `group`
    for i, e in enumerate(examples):
        members.setdefault(group(e) if group is not None else i, []).append(i)
    by_label: dict = {}
    for indices in members.values():
        by_label.setdefault(key(examples[indices[0]]), []).append(indices)
    rng = random.Random(seed)
    val: set[int] = set()
    for label in sorted(by_label):
        units = by_label[label]
        n_val = round(len(units) * val_fraction)
        if len(units) >= 2:
            n_val = min(max(n_val, 1), len(units) - 1)
        chosen = list(units)
        rng.shuffle(chosen)
        for indices in chosen[:n_val]:
            val.update(indices)
    return ([e for i, e in enumerate(examples) if i not in val],
            [e for i, e in enumerate(examples) if i in val])


def duplicate_groups(examples: Sequence, group: Callable) -> list[list]:
    """Groups (in file order) of two or more examples with the same `group` key."""
    groups: dict = {}
    for e in examples:
        groups.setdefault(group(e), []).append(e)
    return [g for g in groups.values() if len(g) > 1]


def split_without_leakage(examples: Sequence, val_fraction: float, seed: int, source: str,
                          key: Callable = lambda e: e.label, group: Callable = lambda e: e.text,
                          what: str = "text") -> tuple[list, list]:
    """`stratified_split` with duplicates (same `group` key) kept on one side, and a
    warning that counts them, so a repeated row never scores the model on its own training
    data."""
    groups = duplicate_groups(examples, group)
    if groups:
        extra = sum(len(g) - 1 for g in groups)
        log.warning("%s: %d rows repeat another row's %s (%d groups, e.g. lines %s); each group is kept "
                    "whole on one side of the train/validation split, so none is both trained and held out",
                    source, extra, what,
                    len(groups), ", ".join(str(e.line) for e in groups[0]))
    train, val = stratified_split(examples, val_fraction, seed, key=key, group=group)
    if not val or not train:
        raise ValueError(
            f"{source}: {len(examples)} row{'s are' if len(examples) != 1 else ' is'} too few to hold out a "
            f"validation split at "
            f"val_fraction={val_fraction} (none is left to {'validate on' if not val else 'train on'}: only 2 or more "
            f"distinct {what}s, of one label for a classifier, give one away). Give a validation file (--val-file), a "
            f"larger training file, or a larger --val-fraction")
    return train, val


def leaked(train: Sequence, val: Sequence, group: Callable) -> list[tuple[int, int]]:
    """(validation line, training line) of each validation row whose `group` key (its text,
    its prompt) also occurs in the training rows."""
    first: dict = {}
    for e in train:
        first.setdefault(group(e), e.line)
    return [(e.line, first[group(e)]) for e in val if group(e) in first]


def report_leakage(train: Sequence, val: Sequence, group: Callable, train_file: str, val_file: str,
                   what: str) -> int:
    """Warn (with counts and example lines) when validation rows also occur in training;
    return how many do. Their scores measure memory, not generalization."""
    pairs = leaked(train, val, group)
    if pairs:
        shown = ", ".join(f"{val_file}:{v} = {train_file}:{t}" for v, t in pairs[:3])
        log.warning("%d of %d validation rows have a %s that also occurs in the training file (%s%s); their "
                    "scores are optimistic: remove them from one of the files", len(pairs), len(val), what, shown,
                    ", ..." if len(pairs) > 3 else "")
    return len(pairs)
