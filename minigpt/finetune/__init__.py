"""Fine-tuning, all in this package: the run config and its typed parts (`config`), one
module per task (`classify`, `completion`, `as_completion`, listed in `tasks.TASK_RUNS`,
shaped by `task`), the entry point that hands a task's run to the shared training loop
(`run.finetune`), what the tasks share (`data`: examples and batches; `split`: the
validation split; `records`: the file reader; `check`: the file checker), the classifier
head, LoRA, few-shot prompting, metrics, export, and file-level evaluation (`evaluate`).
"""
