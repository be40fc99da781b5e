"""Save and load fine-tuned models.

A fine-tuned model folder is a model folder that `GPT.from_pretrained` and `minigpt
sample` read as they are, plus what the task needs:

    config.json, model.safetensors   the backbone, LoRA merged, in GPT-2's or GPT-Neo's
                                     Hugging Face layout when the config is one of them
    vocab.json, merges.txt,          the tokenizer, added special tokens included, in the files
    tokenizer_config.json, ...       transformers' GPT2Tokenizer reads (minigpt's tokenizer.json
                                     for other tokenizers); see `minigpt.tokenizer.save_tokenizer`
    finetune.json                    task, max_length, separator/stop, how it was trained
    classifier_head.safetensors      {"score.weight": (num_labels, n_embd)}   (classifiers)
    labels.json                      id2label / label2id                      (classifiers)
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn
from safetensors.torch import save_file

from minigpt.config import reject_unknown_keys
from minigpt.files import BadFileError, load_safetensors, read_json, writing
from minigpt.finetune.classifier import GPTClassifier
from minigpt.finetune.config import TASKS
from minigpt.finetune.data import LabelMap
from minigpt.finetune.lora import has_lora, merge_lora
from minigpt.model import GPT
from minigpt.tokenizer import load_tokenizer, save_tokenizer
from minigpt.typed import check_fields

HEAD_FILE = "classifier_head.safetensors"
LABELS_FILE = "labels.json"
META_FILE = "finetune.json"


@dataclass(frozen=True)
class FinetuneMeta:
    """What a fine-tuned folder's finetune.json records."""

    task: str
    """"classify" or "completion"."""
    max_length: int | None = None
    """Classifiers: tokens kept per text (the first max_length)."""
    separator: str = ""
    """Completion models: text to append to a prompt before sampling (as in training)."""
    stop: str = ""
    """Completion models: stop sequence the completions ended with, if any."""
    bos: str = ""
    """Completion models: token put before every prompt in training (so before one to sample from)."""
    details: dict = field(default_factory=dict)
    """How the model was trained (free-form, for people)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} must be one of {TASKS}")


def save_finetuned(model: nn.Module, folder: str | Path, tokenizer, meta: FinetuneMeta,
                   labels: LabelMap | None = None) -> Path:
    """Write `model` (a GPT or GPTClassifier, with or without LoRA) as a fine-tuned folder.

    LoRA adapters are merged into a copy, so the model being trained is left as it is.
    Raises ValueError when a classifier comes without labels or the counts disagree.
    """
    folder = Path(folder)
    with writing(folder):
        _save_finetuned(model, folder, tokenizer, meta, labels)
    return folder


def _save_finetuned(model: nn.Module, folder: Path, tokenizer, meta: FinetuneMeta, labels: LabelMap | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if has_lora(model):
        model = merge_lora(copy.deepcopy(model))
    if isinstance(model, GPTClassifier):
        if labels is None or len(labels) != model.num_labels:
            raise ValueError(f"a classifier with {model.num_labels} classes needs a LabelMap of that size; "
                             f"got {None if labels is None else list(labels.labels)}")
        model.backbone.save_pretrained(folder)
        save_file({"score.weight": model.score.weight.detach().cpu().contiguous()}, folder / HEAD_FILE)
        labels.save(folder / LABELS_FILE)
    else:
        model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder, model.config.block_size)
    (folder / META_FILE).write_text(json.dumps(meta.__dict__, indent=2, ensure_ascii=False) + "\n")


def read_meta(folder: str | Path) -> FinetuneMeta:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {META_FILE}; it is not a fine-tuned model folder "
                                f"(train one with `minigpt finetune classify|completion`)")
    values = read_json(path, "fine-tuning metadata", keys=("task",), fix="re-export the model")
    try:
        reject_unknown_keys(FinetuneMeta, values)
        return FinetuneMeta(**values)
    except ValueError as err:
        raise BadFileError(f"fine-tuning metadata {path}: {err}; re-export the model") from None


def load_finetuned(folder: str | Path, backend: str = "sdpa") -> tuple[nn.Module, object, FinetuneMeta, LabelMap | None]:
    """(model, tokenizer, meta, labels) of a fine-tuned folder; labels is None for completion
    models. The head's shape is checked against the labels and the backbone."""
    folder = Path(folder)
    meta = read_meta(folder)
    backbone = GPT.from_pretrained(folder, backend=backend)
    tokenizer = load_tokenizer(folder)
    if meta.task == "completion":
        return backbone, tokenizer, meta, None
    labels = LabelMap.load(folder / LABELS_FILE)
    head = load_safetensors(folder / HEAD_FILE)
    weight = head.pop("score.weight", None)
    expected = (len(labels), backbone.config.n_embd)
    if weight is None or head or tuple(weight.shape) != expected:
        found = {k: tuple(v.shape) for k, v in load_safetensors(folder / HEAD_FILE).items()}
        raise ValueError(f"{folder / HEAD_FILE} must hold only score.weight of shape {expected} "
                         f"(labels x n_embd); it holds {found}")
    model = GPTClassifier(backbone, len(labels))
    model.score.weight.data.copy_(weight)
    return model, tokenizer, meta, labels


def saved_stop(folder: str | Path) -> list[str]:
    """[stop sequence] a fine-tuned completion model was trained with; [] for other folders."""
    if not (Path(folder) / META_FILE).is_file():
        return []
    stop = read_meta(folder).stop
    return [stop] if stop else []
