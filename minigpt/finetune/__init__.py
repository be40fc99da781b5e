"""Fine-tuning: data and its checker, classification heads, LoRA, few-shot prompting, metrics.

The entry point that sets a run up and hands it to the shared training loop is
`minigpt.train.finetune`; evaluation and prediction are in `minigpt.finetune.evaluate`.
"""
