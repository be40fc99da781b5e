"""Few-shot classification by prompting, with no training (Brown et al. 2020, section 2).

The prompt holds k labeled examples rendered with a template, then the query:

    Review: a gem of a film
    Sentiment: positive

    Review: dull and overlong
    Sentiment: negative

    Review: <query>
    Sentiment:

Each label's continuation (" positive", " negative") is scored by its log-likelihood
under the model, sum_j log p(label token j | prompt, label tokens < j), and the best
label is the prediction. This is the baseline a fine-tune has to beat.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from minigpt.finetune.data import LabeledText

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FewShotPrompt:
    """How examples and the query are rendered."""

    template: str = "Review: {text}\nSentiment:"
    """Renders one text; it must contain {text}. The label follows it."""
    label_prefix: str = " "
    """Put between the template and the label (GPT-2's tokens carry their leading space)."""
    separator: str = "\n\n"
    """Between examples."""
    verbalizers: dict[str, str] = field(default_factory=dict)
    """Words to use for labels (e.g. {"sci_tech": "science"}); a label not listed is used as is."""
    normalize: bool = False
    """Score by mean log-likelihood per token instead of the sum (favours long labels less)."""

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise ValueError(f"template={self.template!r} must contain {{text}}")

    def word(self, label: str) -> str:
        return self.verbalizers.get(label, label)

    def render(self, shots: Sequence[LabeledText], text: str) -> str:
        parts = [self.template.format(text=s.text) + self.label_prefix + self.word(s.label) for s in shots]
        return self.separator.join([*parts, self.template.format(text=text)])


def select_shots(examples: Sequence[LabeledText], k: int, seed: int = 1337) -> list[LabeledText]:
    """k examples, as balanced over labels as k allows (round-robin over sorted labels, rows
    chosen by a seeded shuffle), then shuffled so the labels do not follow a fixed cycle."""
    if k < 0:
        raise ValueError(f"k={k} must be >= 0")
    rng = random.Random(seed)
    by_label: dict[str, list[LabeledText]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    pools = {label: rng.sample(rows, len(rows)) for label, rows in sorted(by_label.items())}
    shots: list[LabeledText] = []
    while len(shots) < k and any(pools.values()):
        for label in sorted(pools):
            if pools[label] and len(shots) < k:
                shots.append(pools[label].pop())
    if len(shots) < k:
        raise ValueError(f"k={k} shots requested but only {len(examples)} examples are available")
    rng.shuffle(shots)
    return shots


@torch.no_grad()
def continuation_logprobs(model, prompt: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per-token log p(continuation token | prompt, earlier continuation tokens), for each
    continuation, in one right-padded forward pass.

    model: a GPT (anything whose forward(idx).logits is (B, T, V)); prompt and each
    continuation must be non-empty, and prompt + continuation must fit in block_size.
    """
    if not prompt or any(len(c) == 0 for c in continuations):
        raise ValueError("the prompt and every continuation need at least one token")
    rows = [list(prompt) + list(c) for c in continuations]
    T = max(map(len, rows))
    if T > model.config.block_size:
        raise ValueError(f"prompt + continuation is {T} tokens, more than block_size={model.config.block_size}")
    device = next(model.parameters()).device
    idx = torch.zeros(len(rows), T, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        idx[i, : len(row)] = torch.tensor(row)
    was_training = model.training
    model.eval()
    P = len(prompt)
    try:
        # Only the positions that predict continuation tokens need logits: the (T, V) head
        # and softmax at every prompt position cost more than the rest of a small model.
        if hasattr(model, "hidden") and hasattr(model, "lm_head"):
            x, _, _ = model.hidden(idx)  # (B, T, C)
            logits = model.lm_head(x[:, P - 1 : T - 1])  # (B, T - P, V)
        else:
            logits = model(idx).logits[:, P - 1 : T - 1]  # (B, T - P, V)
    finally:
        model.train(was_training)
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T - P, V)
    out = []
    for i, c in enumerate(continuations):
        # The logits at position P - 1 + j (row j here) predict continuation token j.
        positions = torch.arange(len(c), device=device)
        out.append(logp[i, positions, torch.tensor(list(c), device=device)].tolist())
    return out


@dataclass(frozen=True)
class FewShotClassifier:
    """Predicts labels for texts by scoring each label after a k-shot prompt."""

    model: object
    tokenizer: object
    labels: tuple[str, ...]
    shots: tuple[LabeledText, ...] = ()
    prompt: FewShotPrompt = FewShotPrompt()

    def _label_ids(self) -> list[list[int]]:
        return [self.tokenizer.encode(self.prompt.label_prefix + self.prompt.word(label)) for label in self.labels]

    def _prompt_ids(self, text: str, longest_label: int) -> list[int]:
        """The prompt with as many shots as fit in the context (dropping the first ones)."""
        budget = self.model.config.block_size - longest_label
        shots = list(self.shots)
        while True:
            ids = self.tokenizer.encode(self.prompt.render(shots, text))
            if len(ids) <= budget:
                return ids
            if not shots:
                # Keep the end of the query, which is where the label is read.
                log.warning("a query alone is %d tokens; keeping its last %d", len(ids), budget)
                return ids[-budget:]
            shots.pop(0)

    def scores(self, text: str) -> list[float]:
        """One score per label: summed (or, with normalize, mean) label-token log-likelihood."""
        label_ids = self._label_ids()
        prompt = self._prompt_ids(text, max(map(len, label_ids)))
        per_token = continuation_logprobs(self.model, prompt, label_ids)
        return [sum(lp) / (len(lp) if self.prompt.normalize else 1) for lp in per_token]

    def predict(self, text: str) -> int:
        s = self.scores(text)
        return max(range(len(s)), key=s.__getitem__)
