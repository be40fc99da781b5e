"""Fine-tuning, all in this package: the run config and its training defaults (`config`),
one run per task (`tasks`), the entry point that hands a run to the shared training loop
(`run.finetune`), data readers and their checker (`data`, `records`, `check`),
classification heads, LoRA, few-shot prompting, metrics, export, and evaluation and
prediction (`evaluate`).
"""
