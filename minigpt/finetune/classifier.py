"""Sequence classification: a linear head on the hidden state of the last real token.

This is the behaviour users know from `transformers`' GPT2ForSequenceClassification: a
causal model's last position is the only one that has seen the whole text, so the head
reads the final normed hidden state there. Batches are right-padded, and `lengths` says
where each row's last real token is, so padding never reaches the head.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.config import GPTConfig
from minigpt.model import GPT


class GPTClassifier(nn.Module):
    """A GPT backbone plus `score`, a bias-free linear map from n_embd to num_labels."""

    def __init__(self, backbone: GPT, num_labels: int) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels={num_labels} must be at least 2; a classifier needs two classes")
        self.backbone = backbone
        self.score = nn.Linear(backbone.config.n_embd, num_labels, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)

    @property
    def config(self) -> GPTConfig:
        return self.backbone.config

    @property
    def num_labels(self) -> int:
        return self.score.out_features

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) right-padded token ids; lengths: (B,) real tokens per row (None: all T).

        Returns (B, num_labels) logits. Raises ValueError for lengths of the wrong shape and,
        in eval mode with lengths on the CPU, for a length outside 1..T.

        Training never reads the values: that would make every step wait for the device (and
        break a torch.compile graph); `collate_classification` checks them where batches are
        built. A direct call in eval mode with CPU lengths (a user's own batch) costs no wait.
        """
        B, T = idx.shape
        if lengths is None:
            lengths = torch.full((B,), T, device=idx.device)
        checked = not self.training and lengths.device.type == "cpu"
        if lengths.shape != (B,) or (checked and not bool(((lengths >= 1) & (lengths <= T)).all())):
            raise ValueError(f"lengths must be (B,)={B} values in 1..{T}; got {lengths.tolist()}")
        h, _, _ = self.backbone.hidden(idx)  # (B, T, C)
        last = h[torch.arange(B, device=idx.device), lengths - 1]  # (B, C)
        return self.score(last)  # (B, num_labels)


def classification_loss(
    model: GPTClassifier, batch: dict[str, torch.Tensor], class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of the head's logits against batch["labels"], optionally class-weighted.

    With weights w, the loss is sum_i w[y_i] * CE_i / sum_i w[y_i], as in `F.cross_entropy`.
    """
    logits = model(batch["idx"], batch["lengths"])  # (B, num_labels)
    if class_weights is not None:
        class_weights = class_weights.to(device=logits.device, dtype=torch.float32)
    return F.cross_entropy(logits.float(), batch["labels"], weight=class_weights)


class ClassificationLoss:
    """`classification_loss` with fixed class weights, in the loop's loss_fn(model, batch) form."""

    def __init__(self, class_weights: Sequence[float] | None = None) -> None:
        self.class_weights = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)

    def __call__(self, model: GPTClassifier, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return classification_loss(model, batch, self.class_weights)

    def items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the loss on `batch` (a CPU batch) is a mean over: its rows, each weighing its
        class's weight (the training loop weighs micro-batches by it, `loop.loss_items`)."""
        labels = batch["labels"]
        if self.class_weights is None:
            return torch.tensor(labels.shape[0], dtype=torch.float64)
        return self.class_weights[labels].double().sum()


def balanced_class_weights(label_ids: Sequence[int], num_labels: int) -> list[float]:
    """n / (num_labels * count_c) per class (the usual "balanced" heuristic); a class absent
    from the training data is an error because its weight would be infinite."""
    counts = [0] * num_labels
    for y in label_ids:
        counts[y] += 1
    absent = [c for c, n in enumerate(counts) if n == 0]
    if absent:
        raise ValueError(f"classes {absent} have no training rows, so balanced weights are undefined")
    n = len(label_ids)
    return [n / (num_labels * c) for c in counts]


@torch.no_grad()
def predict_proba(model: GPTClassifier, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, num_labels) class probabilities for a collated batch, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        logits = model(batch["idx"], batch["lengths"])
    finally:
        model.train(was_training)
    return torch.softmax(logits.float(), dim=-1)
