"""Fine-tuning entry point: set a run up, then hand it to the shared training loop.

Pretraining and fine-tuning share `minigpt.train.loop.train` (optimizer, schedule,
checkpoints, resume, logging, early stopping); fine-tuning differs only in setup: the
model and tokenizer from `--init`, named bos/pad/separator tokens added to both when new
(`minigpt.model_dir.start_model`), the task's run (`minigpt.finetune.tasks`), and which
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from minigpt.finetune.config import FinetuneConfig
from minigpt.finetune.export import save_finetuned
from minigpt.finetune.metrics import write_report
from minigpt.finetune.task import RunStart, TaskRun
from minigpt.finetune.tasks import TASK_RUNS
from minigpt.model import GPT
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


def prepare(config: FinetuneConfig, train_config: TrainConfig, *, model: GPT | None = None,
            tokenizer=None) -> tuple[TaskRun, object]:
    """Build the model, data and hooks of a run without training (for inspection and tests)."""
    from minigpt.device import check_device
    from minigpt.model_dir import start_model

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
    from minigpt.train import distributed as dist_
    from minigpt.train import runfolder

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
    from minigpt.train.checkpoint import read_model_state

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
