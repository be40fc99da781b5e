"""K-shot prompts (Brown et al. 2020, section 2.4): "For few-shot learning, we evaluate each
example in the evaluation set by randomly drawing K examples from that task's training set
as conditioning, delimited by 1 or 2 newlines depending on the task."

Each example gets its own K demonstrations, drawn by a generator seeded with (seed, the
example's index), so a run is reproducible and does not depend on the order of evaluation.
The scored example is never among its own demonstrations: when the demonstrations come from
the evaluated file itself its index is left out, and from a separate file any row with the
same content is left out.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from minigpt.evaluation.tasks import Cloze, Example, FreeForm, MultipleChoice


@dataclass(frozen=True)
class PromptFormat:
    """How demonstrations and the query are joined."""

    separator: str = "\n\n"
    """Between demonstrations, and between the last one and the query."""
    target_delimiter: str = " "
    """Between a multiple-choice context and its choice; it belongs to the scored continuation
    (as in lm-evaluation-harness), so GPT-2's space-prefixed word tokens are what is scored."""
    unconditional_prompt: str | None = "Answer:"
    """The neutral context for the paper's unconditional normalization; None skips it."""
    stop: str = "\n"
    """Free-form: a greedy completion is cut at the first stop string (answers are one line)."""

    def demonstration(self, example: Example) -> str:
        """A solved example: the query followed by its answer."""
        if isinstance(example, MultipleChoice):
            return example.context + self.target_delimiter + example.choices[example.label]
        if isinstance(example, Cloze):
            return example.text
        return example.prompt + example.completion

    def query(self, example: Example) -> str:
        """What the model sees of the example it is scored on."""
        if isinstance(example, MultipleChoice):
            return example.context
        if isinstance(example, Cloze):
            return example.context
        return example.prompt

    def continuations(self, example: MultipleChoice | Cloze) -> list[str]:
        """The strings whose log-likelihood is scored after the prompt."""
        if isinstance(example, MultipleChoice):
            return [self.target_delimiter + c for c in example.choices]
        return [example.target]

    def render(self, demonstrations: Sequence[Example], example: Example) -> str:
        return self.separator.join([*(self.demonstration(d) for d in demonstrations), self.query(example)])


def _same(a: Example, b: Example) -> bool:
    if isinstance(a, FreeForm) and isinstance(b, FreeForm):
        return (a.prompt, a.completion) == (b.prompt, b.completion)
    if isinstance(a, MultipleChoice) and isinstance(b, MultipleChoice):
        return (a.context, a.choices) == (b.context, b.choices)
    return isinstance(a, Cloze) and isinstance(b, Cloze) and a.text == b.text


def draw_demonstrations(pool: Sequence[Example], k: int, seed: int, index: int, example: Example,
                        pool_is_eval_set: bool) -> list[Example]:
    """k demonstrations for the example at `index`, never the example itself.

    pool_is_eval_set: the pool is the evaluated file, so position `index` is the example.
    Raises ValueError when the pool has fewer than k other examples.
    """
    if k < 0:
        raise ValueError(f"shots={k} must be >= 0")
    if k == 0:
        return []
    candidates = [i for i, d in enumerate(pool)
                  if not (pool_is_eval_set and i == index) and not _same(d, example)]
    if len(candidates) < k:
        raise ValueError(f"shots={k} demonstrations requested but only {len(candidates)} other examples are in "
                         f"the pool; lower --shots or give a larger --demos file")
    rng = random.Random(f"{seed}:{index}")  # str seeds are hashed with sha512: stable across runs
    return [pool[i] for i in rng.sample(candidates, k)]


def build_prompts(examples: Sequence[Example], k: int, seed: int, fmt: PromptFormat,
                  demos: Sequence[Example] | None = None, fixed: Sequence[Example] | None = None) -> list[str]:
    """One prompt per example: K demonstrations from `demos` (default: the other examples),
    or the same `fixed` demonstrations for every example, then the example's query."""
    if fixed is not None:
        return [fmt.render(fixed, e) for e in examples]
    pool = examples if demos is None else demos
    return [fmt.render(draw_demonstrations(pool, k, seed, i, e, demos is None), e) for i, e in enumerate(examples)]
