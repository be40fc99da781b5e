"""Scoring rules, stated once.

Multiple choice, for choice i with summed log-likelihood ll_i = log p(delimiter + choice_i | prompt):
- `acc`: argmax_i ll_i (Brown et al. 2020, section 2.4, the raw comparison);
- `acc_norm`: argmax_i ll_i / len(choice_i), the choice's length in characters without the
  target delimiter (lm-evaluation-harness's `completion_len = [float(len(i)) for i in
  choices]`, used for HellaSwag; for ASCII text characters are bytes);
- `acc_uncond`: argmax_i ll_i - log p(delimiter + choice_i | "Answer:"), the paper's
  normalization by the completion's unconditional probability
  P(completion | context) / P(completion | answer_context) (section 2.4, used there for
  ARC, OpenBookQA and RACE).
Ties go to the first choice (numpy/torch argmax). Every mean of per-example scores comes
with its standard error, sample std (n - 1) / sqrt(n), as lm-evaluation-harness's
`mean_stderr` computes it; it is None for a single example.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties."""
    return max(range(len(values)), key=values.__getitem__)


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, standard error of the mean) with the sample standard deviation."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def normalize_answer(text: str) -> str:
    """SQuAD's normalization (Rajpurkar et al. 2016, the official evaluation script): lower
    case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: harmonic mean of precision and recall of the normalized words."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)
