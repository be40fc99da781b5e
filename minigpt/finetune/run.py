"""Fine-tuning entry point: set a run up, then hand it to the shared training loop.

Pretraining and fine-tuning share `minigpt.train.loop.train` (optimizer, schedule,
checkpoints, resume, logging, early stopping); fine-tuning differs only in setup: the
model and tokenizer from `--init`, named bos/pad/separator tokens added to both when new
(`start_model`, `add_tokens`), the task's run (`minigpt.finetune.tasks`), and which
parameters train: all, the last N blocks (and the head), or LoRA adapters only
(`RunStart.choose_trainable`). The config is read through its typed parts: `init` and
`tokens` by the start, `adapter` by `RunStart`, and `data` by the task's own module, which
builds the frozen `TaskRun` once.

The best checkpoint (by `TrainConfig.best_metric`) is exported to OUT/model as a
fine-tuned folder (LoRA merged, see `minigpt.finetune.export`) and evaluated on the
validation data into OUT/eval.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from minigpt.device import check_device
from minigpt.finetune.config import FinetuneConfig
from minigpt.finetune.data import LabelMap
from minigpt.finetune.export import HEAD_FILE, LABELS_FILE, save_finetuned
from minigpt.finetune.metrics import write_report
from minigpt.finetune.task import RunStart, TaskRun
from minigpt.finetune.tasks import TASK_RUNS
from minigpt.model import GPT
from minigpt.model_dir import preset_model_config, resolve_model_dir
from minigpt.tokenizer import Tokenizer, check_fits_model, load_tokenizer
from minigpt.train import distributed as dist_
from minigpt.train import runfolder
from minigpt.train.checkpoint import read_model_state
from minigpt.train.config import TrainConfig
from minigpt.train.loop import train

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    model_dir: Path
    """The exported best model (a fine-tuned folder)."""
    report: Any
    """Its evaluation on the validation data (ClassificationReport or CompletionReport)."""
    train_result: Any
    """What the training loop returned."""
    trainable_params: int = 0
    total_params: int = 0


def start_model(spec: str | Path | GPT, special_tokens: Sequence[str] = (), pad_token: str | None = None, *,
                tokenizer=None, backend: str = "sdpa", seed: int = 0) -> tuple[GPT, object]:
    """(GPT, tokenizer) to fine-tune from, with `special_tokens` added to both.

    spec: a model, run or fine-tuned folder (`minigpt.model_dir.resolve_model_dir`); a preset
        name, for a fresh random model with GPT-2's tokenizer (the from-scratch baseline a
        pretrained start should beat; when no such folder exists); or a GPT already in
        memory, taken as it is (with `tokenizer`, else GPT-2's).
    special_tokens: added to the tokenizer and the model (`add_tokens`); pad_token, one of
        them, then pads batches.
    tokenizer: use this one instead of the folder's (checked against the model all the same).

    Raises ValueError for a preset whose vocabulary cannot hold GPT-2's tokens and for special
    tokens asked of a tokenizer other than GPT-2's; BadFileError when the tokenizer gives ids
    the model has no row for (`check_fits_model`); FileNotFoundError (listing what it looked
    for) when `spec` is neither a folder nor a preset.
    """
    if isinstance(spec, GPT):
        model, tokenizer = spec, tokenizer if tokenizer is not None else Tokenizer()
    elif not Path(spec).exists() and (config := preset_model_config(str(spec))) is not None:
        tokenizer = tokenizer if tokenizer is not None else Tokenizer()
        if config.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"preset {spec!r} has vocab_size={config.vocab_size}, fewer than GPT-2's {tokenizer.vocab_size} "
                f"tokens that fine-tuning uses; choose a GPT-2-vocabulary preset such as tiny-bpe or gpt2")
        log.info("starting from a fresh random %s model (seed %d): the from-scratch baseline", spec, seed)
        torch.manual_seed(seed)
        model = GPT(config, backend=backend)
    else:
        folder = resolve_model_dir(spec)
        _warn_classifier_parts_dropped(folder)
        model = GPT.from_pretrained(folder, backend=backend)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(folder)
        check_fits_model(tokenizer, model.config.vocab_size, folder)  # also GPT-2's, when the folder names none
    if special_tokens:
        if not isinstance(tokenizer, Tokenizer):
            raise ValueError(f"special tokens {list(special_tokens)} need GPT-2's tokenizer; this model's is "
                             f"{type(tokenizer).__name__}")
        if not add_tokens(model, tokenizer, special_tokens):
            log.info("special tokens %s are already in the vocabulary", list(special_tokens))
    if pad_token:
        tokenizer.set_pad_token(pad_token)
    return model, tokenizer


@torch.no_grad()
def add_tokens(model: GPT, tokenizer, tokens: Sequence[str]) -> list[str]:
    """Add special `tokens` to `tokenizer` and make `model` fit it; return the tokens that were new.

    When the model already has rows for the new ids (a vocab_size padded beyond the
    tokenizer's, e.g. 50304), those padding rows are reused and set to the mean of the
    tokenizer's real rows, as `GPT.resize_token_embeddings` sets new rows; otherwise the
    model grows to the tokenizer's vocabulary. Tokens already present change nothing.
    """
    real = tokenizer.vocab_size
    new = tokenizer.add_special_tokens(tokens)
    if not new:
        return new
    needed, have = tokenizer.vocab_size, model.config.vocab_size
    if have >= needed:
        weights = [model.tok_emb.weight]
        if model.lm_head.weight is not model.tok_emb.weight:
            weights.append(model.lm_head.weight)
        for w in weights:
            w[real:needed] = w[:real].float().mean(0).to(w.dtype)
        log.info("added tokens %s as ids %d..%d, reusing the model's padding rows (vocab_size=%d)",
                 new, real, needed - 1, have)
    else:
        model.resize_token_embeddings(needed, mean_of=min(real, have))
        log.info("added tokens %s as ids %d..%d (token embeddings resized from %d to %d rows)",
                 new, real, needed - 1, have, needed)
    return new


def _warn_classifier_parts_dropped(folder: Path) -> None:
    """Fine-tuning from a fine-tuned classifier starts from its backbone: say that its head and
    labels are not carried over, rather than drop them without a word."""
    if not (folder / HEAD_FILE).is_file():
        return
    labels = ""
    if (folder / LABELS_FILE).is_file():
        labels = f" and its labels {list(LabelMap.load(folder / LABELS_FILE).labels)}"
    log.warning("%s is a fine-tuned classifier: fine-tuning starts from its transformer (the backbone); its "
                "classification head (%s)%s are not carried over", folder, HEAD_FILE, labels)


def prepare(config: FinetuneConfig, train_config: TrainConfig, *, model: GPT | None = None,
            tokenizer=None) -> tuple[TaskRun, object]:
    """Build the model, data and hooks of a run without training (for inspection and tests)."""
    check_device(train_config.device)
    if model is None and config.init is None:
        raise ValueError("say where to start: FinetuneConfig.init (--init) names a model or run folder, or a "
                         "preset for a fresh random model")
    tokens = config.tokens
    backbone, tokenizer = start_model(config.init if model is None else model, tokens.names, tokens.pad or None,
                                      tokenizer=tokenizer, backend=train_config.backend, seed=train_config.seed)
    torch.manual_seed(train_config.seed)  # the new head and adapters start the same for a seed
    start = RunStart(backbone, tokenizer, train_config, config.eval_batch_size, tokens, config.adapter,
                     config.train_last_blocks, dataclasses.asdict(config))
    return TASK_RUNS[config.task_run](config.data, start), tokenizer


def finetune(config: FinetuneConfig, train_config: TrainConfig, *, model: GPT | None = None, tokenizer=None,
             resume: bool = False, overwrite: bool = False) -> FinetuneResult:
    """Fine-tune, export the best model to OUT/model and evaluate it into OUT/eval.

    model/tokenizer: start from this GPT instead of `config.init` (e.g. a fresh one).
    Every checkpoint the loop writes is itself a fine-tuned folder (LoRA merged) that
    `minigpt evaluate`/`predict` read; `resume` continues from the newest one that loads.
    OUT must not hold another run unless `resume`, or `overwrite` (which moves it aside).
    Raises ValueError for bad data (naming file and line), inconsistent options, or a run
    folder that is in use or holds another run.
    """
    if train_config.uses_mesh or train_config.parallel == "fsdp":
        raise ValueError(
            f"fine-tuning runs in one process or under DDP (torchrun with train.parallel='auto' or 'ddp'); "
            f"train.parallel={train_config.parallel!r}, dp_replicate={train_config.dp_replicate}, "
            f"dp_shard={train_config.dp_shard}, tp={train_config.tp} ask for the device mesh, which only "
            f"pretraining uses so far: leave them at their defaults")
    with dist_.process_group(train_config.device) as info:
        run, tokenizer = prepare(config, train_config, model=model, tokenizer=tokenizer)
        out = Path(train_config.out_dir)

        def save_model(model: nn.Module, folder: Path) -> None:
            save_finetuned(model, folder, tokenizer, run.meta, run.labels)

        metadata = {"finetune": dataclasses.asdict(config), "model": run.model.config.to_dict(),
                    "labels": list(run.labels.labels) if run.labels else None}
        with runfolder.claim(out, resume=resume, overwrite=overwrite, is_main=info.is_main) as claimed:
            result = train(run.model, train_config, run.train_batches, eval_batches=run.eval_batches,
                           loss_fn=run.loss_fn, extra_eval=run.extra_eval, save_model=save_model, folder=claimed,
                           run_metadata=metadata)
            return _export(config.task, run, result, save_model, out, info)


def _export(task: str, run: TaskRun, result, save_model, out: Path, info) -> FinetuneResult:
    """Rank 0: the best checkpoint to OUT/model, evaluated into OUT/eval."""
    if not info.is_main:
        return FinetuneResult(out / "model", None, result, run.details["trainable_params"], run.details["total_params"])
    best = result.best_checkpoint or result.last_checkpoint
    run.model.load_state_dict(read_model_state(best))
    run.model.cpu()
    model_dir = out / "model"
    save_model(run.model, model_dir)
    report = run.evaluate(run.model)
    write_report(report, out / "eval", {"model": str(model_dir), "task": task, "checkpoint": str(best),
                                        "best_step": result.best_step})
    log.info("best checkpoint %s (step %s) exported to %s; its validation report is in %s",
             best, result.best_step, model_dir, out / "eval")
    return FinetuneResult(model_dir, report, result, run.details["trainable_params"], run.details["total_params"])
