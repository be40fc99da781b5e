"""The training loop that pretraining and fine-tuning share.

`train(model, config, batches, ...)` works for any `nn.Module`: a GPT, or a classifier or
LoRA wrapper around one. The caller supplies the batches, the loss and any extra metrics;
the loop supplies everything else, from the parts of this package:

    config.py      TrainConfig, the run config
    optim.py       the optimizer (AdamW, or Muon from muon.py) and the learning-rate schedule
    parallel.py    backend, activation checkpointing, torch.compile, DDP/FSDP, from outside the model
    checkpoint.py  atomic checkpoints, exact resumption (loader; RNG states in rng.py), the same-run check
    distributed.py where this process sits (under torchrun, inside the entry's `process_group`)
    observe.py     the metrics log, throughput and MFU
    state.py       `Run`, what one run carries between these parts, and the saved counters

A step is one optimizer update on the global batch of
dp_size x grad_accum x batch_size sequences (dp_size is the world size, less tensor
parallelism's share: minigpt.train.mesh). `step` counts completed updates, so the
checkpoint called step_0000100 holds the state after 100 updates.

The loss of an update is the mean over every item of the global batch (each target token of
a language-model loss, each row of a classifier's, weighted as its loss weighs them), not the
mean of per-micro-batch means: each micro-batch's mean is weighted by its share of the
global batch's items (`loss_items`, counted on the loader's CPU batches and summed over the
data-parallel ranks), so the gradients do not depend on how the batch is split into ranks
and micro-batches (torchtitan normalises by the global count of target tokens likewise).

Device syncs happen only at read points: log, eval and checkpoint steps and the last step
(nanoGPT likewise reads the loss only when it logs). Each update leaves its loss and gradient
norm on the device (`state.Update`); a read point fetches all of them in one transfer, then
records them in order (train_losses, the metrics window) exactly as if read at once. With
on_nonfinite='stop' (the default) a NaN/inf is therefore found at the next read point: the
run raises naming the first bad update's step, lr and loss, before that step's evaluation or
checkpoint, so no checkpoint ever holds weights from after a non-finite update. On a GPU the
device may have run up to log_interval - 1 more updates past the bad one by then (the
weights in memory are spoilt; nothing from them is saved). on_nonfinite='skip' must decide
before the optimizer steps, so it reads every update (one sync per update). Under float16's
GradScaler an infinite gradient is skipped inside scaler.step, as always.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from minigpt.train import checkpoint as ckpt
from minigpt.train import distributed as dist_
from minigpt.train import runfolder
from minigpt.train.config import TrainConfig
from minigpt.train.host_memory import keep_freed_memory
from minigpt.train.observe import MetricsLog, TrainWindow, peak_flops
from minigpt.train.optim import build_optimizer, lr_at
from minigpt.train.materialize import materialize, on_meta
from minigpt.train.mesh import MeshShape
from minigpt.train.parallel import loss_context, mixed_precision, parallelize
from minigpt.train.rng import seed_rngs
from minigpt.train.state import Batches, Run, TrainResult, Update, read_updates
from minigpt.train.threads import fresh, micro_batch_threads

logger = logging.getLogger(__name__)

__all__ = ["language_model_loss", "loss_items", "train"]


def language_model_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy; targets of -100 are ignored."""
    return model(batch["idx"], batch["targets"]).loss


def loss_items(loss_fn: Callable, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What `loss_fn`'s mean on `batch` (a loader's CPU batch) is a mean over, as a float64
    CPU scalar: the loss's own `items(batch)` when it has one (a class-weighted loss: the sum
    of its rows' weights), else the target tokens that are not -100, else the rows of
    batch["labels"], else 1 (then each micro-batch weighs the same). Tensors all the way: a
    count is never read into Python, so nothing here waits for anything."""
    own = getattr(loss_fn, "items", None)
    if own is not None:
        return torch.as_tensor(own(batch), dtype=torch.float64)
    if "targets" in batch:
        return (batch["targets"] != -100).sum().double()
    if "labels" in batch:
        return torch.tensor(batch["labels"].shape[0], dtype=torch.float64)
    return torch.ones((), dtype=torch.float64)


def _plain(value: torch.Tensor) -> torch.Tensor:
    """A loss as a plain tensor (a loss-parallel loss is a replicated DTensor)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def train(
    model: nn.Module,
    config: TrainConfig,
    train_batches: Batches,
    *,
    eval_batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] = language_model_loss,
    extra_eval: Callable[[nn.Module], dict[str, float]] | None = None,
    save_model: Callable[[nn.Module, Path], None] | None = None,
    resume: bool = False,
    run_metadata: dict | None = None,
    checkpoint_files: dict[str, str] | None = None,
    overwrite: bool = False,
    init_seed: int | None = None,
    folder: runfolder.ClaimedFolder | None = None,
) -> TrainResult:
    """Train `model` in place and return its history. See the module docstring.

    Args:
        model: any module; only parameters with requires_grad=True are optimized.
        train_batches: resumable batches (CPU tensors; `loss_fn` reads them).
        eval_batches: returns a fresh, fixed iterable each evaluation (at most
            config.eval_steps batches are read); its mean loss is 'val_loss'.
        loss_fn: (model, batch) -> scalar loss; the default is `language_model_loss`.
        extra_eval: (model) -> metrics merged into each evaluation (e.g. accuracy).
        save_model: writes the model into a checkpoint folder; the default writes its
            state_dict to model.safetensors plus, for a GPT, config.json. When the folder
            it writes lacks that state_dict, the loop adds trainer_model.safetensors so
            the run can resume.
        resume: continue from the newest checkpoint in config.out_dir that loads (a damaged
            newer one is skipped with a warning; a fresh start, with a warning, if there is none).
        overwrite: when config.out_dir already holds a run and resume is False, move it aside
            to `<out_dir>.old-<time>` instead of refusing (minigpt.train.runfolder).
        run_metadata: JSON-able facts about the run (model config, data) saved with every
            checkpoint and compared on resume.
        checkpoint_files: small text files written into every checkpoint (name -> text),
            e.g. the tokenizer.
        init_seed: for a model built on the meta device (never allocated whole): the seed its
            shards are filled from after it is distributed (`minigpt.train.materialize`).
        folder: config.out_dir as an entry point already claimed it (`runfolder.claim`, which
            decided resume and overwrite); without it the loop claims the folder itself.

    Raises:
        ValueError: bad arguments, a checkpoint whose config or shapes disagree, no
            checkpoint that loads on resume, or a run folder in use or already holding a run
            (`RunFolderError`).
        NonFiniteLossError: the loss became NaN/inf and config.on_nonfinite == 'stop' (found at
            the next log, eval or checkpoint step; see the module docstring), or
            config.max_consecutive_skips updates in a row were skipped.
    """
    info = dist_.current().with_tp(config.tp)
    parallel = dist_.resolve_parallel(config.parallel, info, config.uses_mesh)
    if config.checkpoint_format == "sharded" and parallel != "fsdp":
        raise ValueError(f"train.checkpoint_format='sharded' is written on the mesh path (train.parallel='fsdp' "
                         f"under torchrun); this run is {parallel!r}: use checkpoint_format='full' or 'auto'")
    if parallel == "fsdp" and save_model is not None:
        raise ValueError("save_model is not supported with parallel='fsdp'; the loop saves the gathered state_dict")
    if config.early_stopping_patience and eval_batches is None and extra_eval is None:
        raise ValueError("early_stopping_patience needs evaluations: pass eval_batches or extra_eval")
    if on_meta(model) and init_seed is None:
        raise ValueError("the model is on the meta device (built without memory); pass init_seed so that the "
                         "loop can fill its shards after distributing it (minigpt.train.materialize)")
    root = Path(config.out_dir) / "checkpoints"
    checkpointer = ckpt.Checkpointer(root, config, info, run_metadata, checkpoint_files, save_model)
    if folder is not None:
        if folder.path != Path(config.out_dir).expanduser().resolve():
            raise ValueError(f"folder={folder.path} was claimed, but train.out_dir={config.out_dir!r}; claim the run's "
                             f"own folder")
        return _train(model, config, train_batches, info, parallel, folder.resume, eval_batches, extra_eval,
                      loss_fn, checkpointer, init_seed)
    with runfolder.claim(config.out_dir, resume=resume, overwrite=overwrite, is_main=info.is_main) as claimed:
        return _train(model, config, train_batches, info, parallel, claimed.resume, eval_batches, extra_eval,
                      loss_fn, checkpointer, init_seed)


def _train(model, config, batches, info, parallel, resume, eval_batches, extra_eval, loss_fn,
           checkpointer: ckpt.Checkpointer, init_seed) -> TrainResult:
    """Build the `Run` (device, parallel module, optimizer, precision), resume into it, then loop."""
    device = dist_.resolve_device(config.device, info)
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    resume_from, saved = checkpointer.find(model) if resume else (None, None)
    if resume and resume_from is None and info.is_main:
        logger.warning("resume=True but %s holds no checkpoint; starting from step 0", checkpointer.root)
    checkpointer.clean_leftovers()
    if resume_from is None:
        seed_rngs(config.seed + info.rank)

    if on_meta(model) and parallel != "fsdp":  # nothing to shard it over: allocate it whole here
        materialize(model, device, init_seed)
    raw = model if on_meta(model) else model.to(device)
    mesh = None
    if parallel == "fsdp":
        mesh = MeshShape.resolve(info.world_size, config.dp_replicate, config.dp_shard, config.tp)
        gpt = getattr(raw, "backbone", raw)  # a classifier's transformer
        if hasattr(gpt, "config") and hasattr(gpt.config, "mlp_width"):
            mesh.check_model(gpt.config.n_head, gpt.config.mlp_width)
    amp_dtype, scaler, autocast = mixed_precision(device, config.dtype)
    with (keep_freed_memory(device),  # the activations' pages are not faulted in again every step
          parallelize(raw, config, parallel, device, mesh, amp_dtype) as module,
          micro_batch_threads(config.cpu_parallel, config.grad_accum, device, parallel, raw, scaled=scaler is not None,
                              compiled=config.compile) as threads):
        if on_meta(raw):  # distributed while empty: each rank now allocates and fills its shards alone
            materialize(raw, device, init_seed)
        optimizer = build_optimizer(raw, config, device)
        if threads is not None and hasattr(optimizer, "run_jobs"):  # MuonWithAdamW's stacks at once
            optimizer.run_jobs = threads.map
        run = Run(config, info, parallel, device, raw, module, optimizer, scaler, autocast, batches, loss_fn,
                  checkpointer, mesh, threads)
        if resume_from is not None:
            checkpointer.load(saved, run)
            if info.is_main:
                logger.info("resumed from %s (step %d)", resume_from, run.state.step)
                if run.state.step >= config.max_steps:
                    logger.warning("the checkpoint is at step %d, already at max_steps=%d: there is nothing to "
                                   "train; raise --train.max_steps to continue the run", run.state.step,
                                   config.max_steps)
        return _loop(run, resume_from, eval_batches, extra_eval, amp_dtype)


def _loop(run: Run, resume_from: Path | None, eval_batches, extra_eval, amp_dtype: torch.dtype) -> TrainResult:
    config, info, state, raw = run.config, run.info, run.state, run.raw
    out_dir = Path(config.out_dir)
    trainable = [p for p in raw.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in {id(p): p for p in raw.parameters()}.values())
    n_train = sum(p.numel() for p in {id(p): p for p in trainable}.values())
    if config.peak_flops:
        peak, peak_note = config.peak_flops, "set by peak_flops"
    else:
        peak, peak_note = peak_flops(run.device, run.threads.given if run.threads is not None else None)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        layout = run.parallel if run.mesh is None else f"{run.parallel}, mesh {run.mesh}"
        logger.info("training %s parameters (%s trainable) on %s x %d (%s, %s), global batch %d x %d sequences",
                    f"{n_params:,}", f"{n_train:,}", run.device, info.world_size, str(amp_dtype).removeprefix("torch."),
                    layout, info.dp_size * config.grad_accum, config.batch_size)
        logger.info("MFU assumes a peak of %.3g FLOP/s per device: %s", peak, peak_note)
    metrics = MetricsLog(out_dir, state.step if resume_from else None, config.tensorboard, info.is_main)

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=config.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (config.progress and info.is_main))
    last_saved: Path | None = resume_from
    stopped_early = False
    window = TrainWindow(peak, info.dp_size, info.world_size)
    unread: list[Update] = []  # updates since the last read point (see the module docstring)
    run.module.train()
    try:
        with logging_redirect_tqdm():
            while state.step < config.max_steps and not stopped_early:
                began = time.perf_counter()
                unread.append(_update(run, trainable))
                unread[-1].seconds = time.perf_counter() - began
                state.step += 1
                bar.update(1)
                last = state.step == config.max_steps
                log = state.step % config.log_interval == 0 or last
                evaluate = (eval_batches is not None or extra_eval is not None) and (
                    state.step % config.eval_interval == 0 or last)
                due = config.checkpoint_interval and state.step % config.checkpoint_interval == 0
                if log or evaluate or due or config.on_nonfinite == "skip":  # a read point ('skip' read already)
                    grad_norm = _record(run, unread, window)
                if log:
                    window.write(state.step, lr_at(state.step - 1, config), grad_norm, state.skipped, metrics, bar)

                improved = False
                if evaluate:
                    results = _evaluate(run, eval_batches, extra_eval)
                    run.module.train()
                    improved = state.record_eval(results, config)
                    metrics.write("eval", state.step, results)
                    if info.is_main:
                        shown = ", ".join(f"{k} {v:.4f}" for k, v in results.items())
                        logger.info("step %d: %s%s", state.step, shown, " (best)" if improved else "")
                    if config.early_stopping_patience and state.evals_since_best >= config.early_stopping_patience:
                        stopped_early = True
                        if info.is_main:
                            logger.info("early stopping at step %d: %s has not improved for %d evaluations (best %.4f at step %d)",
                                        state.step, config.best_metric, state.evals_since_best, state.best, state.best_step)
                if due or improved or last or stopped_early:
                    last_saved = run.checkpointer.save(run, improved)
    finally:
        bar.close()
        metrics.close()
    return TrainResult(step=state.step, train_losses=state.train_losses, evals=state.evals, best_metric=state.best,
                       best_step=state.best_step, stopped_early=stopped_early, out_dir=out_dir,
                       last_checkpoint=last_saved, best_checkpoint=run.checkpointer.best())


def _update(run: Run, trainable: list[nn.Parameter]) -> Update:
    """One optimizer update. Its loss and gradient norm stay on the device, except under
    on_nonfinite='skip', which reads them to decide whether to apply the update."""
    config, optimizer, scaler, step = run.config, run.optimizer, run.scaler, run.state.step
    lr = lr_at(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    tokens, head_tokens, seq_len = 0, 0, None
    head_positions = getattr(run.loss_fn, "lm_head_positions", None)  # a loss that skips the LM head somewhere
    loaded = [run.batches.next_batch() for _ in range(config.grad_accum)]
    items = torch.stack([loss_items(run.loss_fn, batch) for batch in loaded])  # (grad_accum,) float64, CPU
    # Each micro-batch's mean weighs its share of the global batch's items; x dp_size because
    # DDP and FSDP average gradients over the data-parallel ranks (see the module docstring).
    # As divisors, so that equal micro-batches divide by grad_accum exactly, as `loss /
    # grad_accum` did (a float32 1/40 is not exact).
    if run.info.distributed:  # summed on the device and never read: no sync here
        # Every rank of a tensor-parallel group counted the same batch: / tp.
        global_items = dist_.all_reduce_sum(items.sum().to(run.device)) / run.info.tp
        divisors = (global_items / (items.to(run.device) * run.info.dp_size)).float()
    else:
        divisors = (items.sum() / items).float()
    for cpu_batch in loaded:
        if "idx" in cpu_batch:
            tokens += cpu_batch["idx"].numel()
            head_tokens += head_positions(run.module, cpu_batch) if head_positions else cpu_batch["idx"].numel()
            seq_len = cpu_batch["idx"].shape[-1]
    if run.threads is None:
        total = _backward_in_turn(run, loaded, divisors)
    else:
        total = _backward_on_threads(run, loaded, divisors, trainable)
    mean_loss = dist_.all_reduce_mean(total)
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip if config.grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    update = Update(step + 1, lr, tokens, head_tokens, seq_len,
                    unread=torch.stack([mean_loss.double(), grad_norm.to(mean_loss.device).double()]))
    if config.on_nonfinite == "skip":  # decide before stepping: this update's one device sync
        read_updates([update])
        bad = update.nonfinite(scaled=scaler is not None)
        if bad is not None:
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()
            logger.warning("%s at step %d; skipped this update (on_nonfinite='skip')", bad, step + 1)
            update.skipped = True
            return update
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return update


def _backward_in_turn(run: Run, loaded: list[dict], divisors: torch.Tensor) -> torch.Tensor:
    """Forward and backward of each micro-batch in turn, its loss / divisor accumulating into
    the parameters' .grad (under DDP, gradients are reduced after the last one only). Returns
    the update's loss, the sum of the micro-batches' loss / divisor."""
    total = torch.zeros((), device=run.device)
    for micro, (cpu_batch, divisor) in enumerate(zip(loaded, divisors)):
        batch = {k: v.to(run.device) for k, v in cpu_batch.items()}  # pageable memory: non_blocking would overlap nothing
        last = micro == len(loaded) - 1
        sync = nullcontext() if last or run.parallel != "ddp" else run.module.no_sync()
        with sync, loss_context(run.raw):
            with run.autocast:
                loss = run.loss_fn(run.module, batch)
            scaled = loss / divisor
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        total += _plain(loss.detach()).float() / divisor
    return total


def _backward_on_threads(run: Run, loaded: list[dict], divisors: torch.Tensor,
                         trainable: list[nn.Parameter]) -> torch.Tensor:
    """`_backward_in_turn` with up to run.threads.threads micro-batches at once (on the CPU, one
    process, no scaler, not compiled: minigpt.train.threads checked). Each thread returns its
    micro-batch's loss and the gradients of loss / divisor; they are added in micro-batch
    order, as `_backward_in_turn` adds them, so the sums are the same bit for bit. A group of
    micro-batches at a time, so that at most one set of gradients per thread waits to be added."""
    def gradients(micro: int) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        with fresh(run.autocast):
            loss = run.loss_fn(run.module, loaded[micro])
        return loss.detach(), torch.autograd.grad(loss / divisors[micro], trainable, allow_unused=True)

    total = torch.zeros(())
    width = run.threads.threads
    for first in range(0, len(loaded), width):
        group = range(first, min(first + width, len(loaded)))
        for micro, (loss, grads) in zip(group, run.threads.map(gradients, group)):
            total += loss.float() / divisors[micro]
            for param, grad in zip(trainable, grads):
                if grad is None:
                    continue
                if param.grad is not None:
                    param.grad.add_(grad)
                else:  # laid out as the parameter, as autograd's accumulation lays out .grad
                    param.grad = grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)
    return total


def _record(run: Run, updates: list[Update], window: TrainWindow) -> float:
    """At a read point: read `updates` (one device sync for all), record each in order
    (`LoopState.record`, which raises on the first non-finite one under 'stop', then the
    metrics window) and empty the list. Returns the last update's gradient norm."""
    began = time.perf_counter()
    read_updates(updates)
    updates[-1].seconds += time.perf_counter() - began  # waiting for the device is the updates' time
    for update in updates:
        run.state.record(update, run.config, scaled=run.scaler is not None, root=run.checkpointer.root)
        window.add(update.seconds, update.tokens, None if update.skipped else update.loss, run.raw,
                   update.seq_len, update.head_tokens)
    grad_norm = updates[-1].grad_norm
    updates.clear()
    return grad_norm


@torch.no_grad()
def _evaluate(run: Run, eval_batches, extra_eval) -> dict[str, float]:
    run.module.eval()
    results: dict[str, float] = {}
    if eval_batches is not None:
        def batch_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            batch = {k: v.to(run.device) for k, v in batch.items()}
            with torch.no_grad(), fresh(run.autocast), loss_context(run.raw):  # no_grad: a worker thread's own mode
                return _plain(run.loss_fn(run.module, batch)).float()

        batches = itertools.islice(eval_batches(), run.config.eval_steps)
        losses = run.threads.map(batch_loss, batches) if run.threads is not None else map(batch_loss, batches)
        total, count = torch.zeros((), device=run.device), 0
        for loss in losses:  # added in order, however many threads computed them
            total += loss
            count += 1
        if count == 0:
            raise ValueError("eval_batches() yielded no batches")
        val_loss = dist_.all_reduce_mean(total / count).item()
        results["val_loss"] = val_loss
        results["val_ppl"] = math.exp(min(val_loss, 80.0))
    if extra_eval is not None:
        with run.threads.all_threads() if run.threads is not None else nullcontext():
            results.update({k: float(v) for k, v in extra_eval(run.raw).items()})
    return results
