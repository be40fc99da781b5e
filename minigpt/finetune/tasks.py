"""The fine-tuning tasks, one entry each: a task's data config (`FinetuneConfig.data`) and
what it starts from (`RunStart`) -> its `TaskRun`, ready for the shared training loop.

- classify (`minigpt.finetune.classify`): a head on the last token of labeled texts;
- completion (`minigpt.finetune.completion`): prompt/completion pairs, the prompt masked;
- classify_as_completion (`minigpt.finetune.as_completion`): labeled rows taught as the
  completion of a template, scored by label log-likelihood and greedy exact match.

A new task writes its module with a `<task>_run` and names it here.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from minigpt.finetune.as_completion import as_completion_run
from minigpt.finetune.classify import classify_run
from minigpt.finetune.completion import completion_run, masked_lm_loss  # noqa: F401 (its older import path)
from minigpt.finetune.task import RunStart, TaskRun

TASK_RUNS: dict[str, Callable[[Any, RunStart], TaskRun]] = {
    "classify": classify_run,
    "completion": completion_run,
    "classify_as_completion": as_completion_run,
}
"""`FinetuneConfig.task_run` -> the function that sets its run up from `FinetuneConfig.data`."""
