"""Each fine-tuning task is one entry of TASK_RUNS, reading only its own typed part of the
config; the run a task builds is frozen."""
import dataclasses
import inspect

import pytest

from minigpt.finetune.config import (
    AsCompletionData, ClassifyData, CompletionData, FinetuneConfig, LoRAConfig, SpecialTokens,
)
from minigpt.finetune.task import TaskRun
from minigpt.finetune.tasks import TASK_RUNS

CONFIGS = {
    "classify": FinetuneConfig(task="classify", train_file="t.csv", max_length=8, class_weights="balanced"),
    "completion": FinetuneConfig(task="completion", train_file="t.jsonl", packing=True, add_eos=False),
    "classify_as_completion": FinetuneConfig(task="classify", train_file="t.csv", as_completion=True,
                                             template="Q: {text}\nA:", label_prefix=""),
}
DATA = {"classify": ClassifyData, "completion": CompletionData, "classify_as_completion": AsCompletionData}


def test_every_task_run_is_named_once_and_reads_its_own_data_type():
    assert {config.task_run for config in CONFIGS.values()} == set(TASK_RUNS)
    for name, config in CONFIGS.items():
        assert config.task_run == name and isinstance(config.data, DATA[name])
        first = next(iter(inspect.signature(TASK_RUNS[name]).parameters.values()))
        assert first.annotation in (DATA[name].__name__, DATA[name])


def test_the_typed_parts_carry_the_flat_fields():
    classify, completion, as_completion = (CONFIGS[n].data for n in DATA)
    assert (classify.rows.max_length, classify.class_weights, classify.rows.files.train_file) == (8, "balanced", "t.csv")
    assert (completion.packing, completion.add_eos, completion.files.val_source) == (True, False, "t.jsonl")
    assert (as_completion.template, as_completion.label_prefix) == ("Q: {text}\nA:", "")
    lora = FinetuneConfig(task="classify", train_file="t.csv", lora_rank=4, lora_alpha=8.0).adapter
    assert lora == LoRAConfig(4, 8.0, 0.0, lora.targets) and CONFIGS["classify"].adapter is None
    tokens = FinetuneConfig(task="completion", train_file="t", bos="<|s|>", sep_token="<|sep|>").tokens
    assert tokens == SpecialTokens("<|s|>", "<|sep|>", "") and tokens.frame("p") == "<|s|>p<|sep|>"


def test_a_bad_value_is_refused_whichever_task_would_read_it():
    with pytest.raises(ValueError, match="max_generate=-1"):  # a completion field, on a classify config
        FinetuneConfig(task="classify", train_file="t.csv", max_generate=-1)
    with pytest.raises(ValueError, match="class_weights='inverse'"):
        FinetuneConfig(task="completion", train_file="t.jsonl", class_weights="inverse")


def test_a_task_run_is_frozen():
    assert TaskRun.__dataclass_params__.frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        TaskRun(None, None, None, None, None, None, None).evaluate = None
