"""Zero-, one- and few-shot evaluation from task files, the way the GPT-3 paper does it
(Brown et al. 2020, section 2.4): K demonstrations, then the context, then each candidate
scored by its log-likelihood, or a greedy completion compared with the reference.

- `tasks`: the task file formats and their readers;
- `prompts`: K demonstrations per example, drawn with a fixed seed;
- `scoring`: batched log-likelihoods with the context's KV cache shared by its choices;
- `harness`: one function per task type, the metrics, and the output files.
"""
from minigpt.evaluation.harness import EvalResult, evaluate_examples, run_eval
from minigpt.evaluation.prompts import PromptFormat
from minigpt.evaluation.scoring import score_continuations
from minigpt.evaluation.tasks import Cloze, FreeForm, MultipleChoice, Task, read_task

__all__ = [
    "Cloze", "EvalResult", "FreeForm", "MultipleChoice", "PromptFormat", "Task", "evaluate_examples",
    "read_task", "run_eval", "score_continuations",
]
