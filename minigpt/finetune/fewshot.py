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

It is a multiple-choice task of the evaluation harness (`minigpt.evaluation`): the rendered
template is the context, the label words are the choices, `label_prefix` is the delimiter,
and the same k shots serve every query; scoring is the harness's.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from minigpt.evaluation.metrics import argmax
from minigpt.evaluation.prompts import PromptFormat
from minigpt.evaluation.scoring import score_continuations
from minigpt.evaluation.tasks import MultipleChoice
from minigpt.finetune.classify import LabeledText
from minigpt.typed import check_fields


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
        check_fields(self)
        if "{text}" not in self.template:
            raise ValueError(f"template={self.template!r} must contain {{text}}")

    def word(self, label: str) -> str:
        return self.verbalizers.get(label, label)

    def render(self, shots: Sequence[LabeledText], text: str) -> str:
        """The k-shot prompt for `text`, as the evaluation harness renders it."""
        labels = sorted({s.label for s in shots})
        demos = [as_multiple_choice(s.text, s.label, labels, self) for s in shots]
        return prompt_format(self).render(demos, as_multiple_choice(text, None, labels or [""], self))


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


def continuation_logprobs(model, prompt: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per-token log p(continuation token | prompt, earlier continuation tokens), for each
    continuation: the evaluation harness's scorer (`minigpt.evaluation.scoring`), which
    encodes the prompt once and reuses its KV cache for every continuation.

    model: a GPT; prompt and each continuation must be non-empty, and the longest
    continuation must leave room for the prompt in block_size (a longer prompt is cut from
    the left).
    """
    (scored,) = score_continuations(model, [(prompt, continuations)])
    return [list(s.logprobs) for s in scored]


def as_multiple_choice(text: str, label: str | None, labels: Sequence[str], prompt: FewShotPrompt,
                       line: int = 0) -> MultipleChoice:
    """A labeled text as a multiple-choice example: the rendered template is the context, the
    label words the choices, `label_prefix` the delimiter between them (see `PromptFormat`)."""
    index = labels.index(label) if label is not None else 0
    return MultipleChoice(prompt.template.format(text=text), tuple(prompt.word(l) for l in labels), index, line)


def prompt_format(prompt: FewShotPrompt) -> PromptFormat:
    return PromptFormat(separator=prompt.separator, target_delimiter=prompt.label_prefix, unconditional_prompt=None)


def choose(loglikelihoods: Sequence[float], tokens: Sequence[int], normalize: bool) -> int:
    """The predicted label: summed, or with normalize mean per token, log-likelihood."""
    return argmax([ll / (n if normalize else 1) for ll, n in zip(loglikelihoods, tokens)])


@dataclass(frozen=True)
class FewShotClassifier:
    """Predicts labels for texts by scoring each label after a k-shot prompt."""

    model: object
    tokenizer: object
    labels: tuple[str, ...]
    shots: tuple[LabeledText, ...] = ()
    prompt: FewShotPrompt = FewShotPrompt()

    def scores(self, text: str) -> list[float]:
        """One score per label: summed (or, with normalize, mean) label-token log-likelihood,
        computed by the evaluation harness's multiple-choice scorer on the k-shot prompt
        (a prompt too long for the block is cut from the left)."""
        fmt = prompt_format(self.prompt)
        shots = [as_multiple_choice(s.text, s.label, self.labels, self.prompt) for s in self.shots]
        query = as_multiple_choice(text, None, self.labels, self.prompt)
        ids = self.tokenizer.encode(fmt.render(shots, query))
        (scored,) = score_continuations(self.model, [(ids, [self.tokenizer.encode(c) for c in fmt.continuations(query)])])
        return [s.total / (len(s.logprobs) if self.prompt.normalize else 1) for s in scored]

    def predict(self, text: str) -> int:
        return argmax(self.scores(text))
