"""The training loop that pretraining and fine-tuning share.

`train(model, config, batches, ...)` works for any `nn.Module`: a GPT, or a classifier or
LoRA wrapper around one. The caller supplies the batches, the loss and any extra metrics;
the loop supplies everything else: AdamW over the parameters that require grad, the
learning-rate schedule, gradient accumulation and clipping, mixed precision, DDP/FSDP,
periodic evaluation, early stopping, atomic checkpoints and exact resumption, and the
progress bar / metrics log.

A step is one optimizer update on the global batch of
world_size x grad_accum x batch_size sequences. `step` counts completed updates, so the
checkpoint called step_0000100 holds the state after 100 updates.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from minigpt.config import reject_unknown_keys
from minigpt.files import BadFileError
from minigpt.ops import BACKENDS
from minigpt.train import checkpoint as ckpt
from minigpt.train import distributed as dist_
from minigpt.train import runfolder
from minigpt.train.muon import MuonWithAdamW
from minigpt.train.observe import MetricsLog, model_flops_per_token, peak_flops
from minigpt.typed import PathStr, check_fields

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "muon")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimizer, schedule, evaluation, checkpoints, devices."""

    out_dir: PathStr
    """Run folder: checkpoints/, metrics.jsonl, tensorboard/."""
    max_steps: int
    """Optimizer updates to run in total (counting those before a resume)."""
    batch_size: int
    """Sequences per micro-batch on each rank."""
    grad_accum: int = 1
    """Micro-batches accumulated per update; the global batch is world x grad_accum x batch_size."""
    lr: float = 6e-4
    """Peak learning rate, reached at the end of warm-up."""
    min_lr: float = 6e-5
    """Floor of the cosine decay."""
    warmup_steps: int = 0
    """Updates of linear warm-up from lr / warmup_steps to lr."""
    lr_decay_steps: int | None = None
    """Update at which the cosine decay reaches min_lr; None means max_steps."""
    optimizer: str = "adamw"
    """'adamw', or 'muon': Muon for the weight matrices inside the transformer blocks and
    AdamW for the rest, one lr and schedule for both (minigpt.train.muon)."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not biases, norms or embeddings)."""
    decay_embeddings: bool = False
    """Apply weight decay to embedding tables too."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    eval_interval: int = 250
    """Evaluate every this many updates (and after the last one)."""
    eval_steps: int = 20
    """Batches per evaluation."""
    log_interval: int = 10
    """Write train metrics every this many updates."""
    checkpoint_interval: int = 1000
    """Save a checkpoint every this many updates; 0 means only at the end (and the best)."""
    keep_last: int = 2
    """Step checkpoints to keep besides the best."""
    seed: int = 1337
    """Seed of the RNGs the loop uses (dropout); the data and model have their own."""
    device: str = "auto"
    """'auto' (this rank's GPU, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    dtype: str = "auto"
    """'auto' is bfloat16 autocast on CUDA and float32 elsewhere; 'float16' adds a GradScaler."""
    compile: bool = False
    """Run the model through torch.compile."""
    backend: str = "sdpa"
    """Attention backend set on every GPT in the model: 'math', 'sdpa' or 'triton'."""
    parallel: str = "auto"
    """'auto' (DDP under torchrun), 'none', 'ddp' or 'fsdp' (FSDP2, for models too big for one GPU)."""
    on_nonfinite: str = "stop"
    """A NaN/inf loss or gradient: 'stop' with an error naming the step, or 'skip' the update."""
    max_consecutive_skips: int = 20
    """With on_nonfinite='skip', stop with an error after this many skipped updates in a row:
    a model or data that only yields NaN/inf would otherwise 'train' to the end on nothing."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a better best_metric; None never stops early."""
    best_metric: str = "val_loss"
    """Eval metric that picks the best checkpoint (and drives early stopping)."""
    best_mode: str = "min"
    """Whether lower ('min') or higher ('max') best_metric is better."""
    tensorboard: bool = False
    """Also write TensorBoard event files (needs the tensorboard package)."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; None estimates it (the log says how)."""
    cpu_threads: int = 0
    """torch.set_num_threads on the CPU; 0 keeps torch's default."""

    def __post_init__(self) -> None:
        check_fields(self)  # every value has its field's type (minigpt.typed)

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {rule}")

        def is_int(name: str) -> bool:
            v = getattr(self, name)
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_steps", "log_interval", "keep_last",
                     "max_consecutive_skips"):
            need(is_int(name) and getattr(self, name) >= 1, name, "must be a positive integer")
        for name in ("warmup_steps", "checkpoint_interval", "seed", "cpu_threads"):
            need(is_int(name) and getattr(self, name) >= 0, name, "must be an integer >= 0")
        need(isinstance(self.out_dir, str) and self.out_dir != "", "out_dir", "must be a folder path")
        need(self.lr > 0, "lr", "must be > 0")
        need(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}]")
        if self.lr_decay_steps is not None:
            need(isinstance(self.lr_decay_steps, int) and self.lr_decay_steps >= self.warmup_steps,
                 "lr_decay_steps", f"must be an integer >= warmup_steps={self.warmup_steps}, or None (max_steps)")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}")
        need(not (self.optimizer == "muon" and self.parallel == "fsdp"), "optimizer",
             "cannot be used with parallel='fsdp': Muon orthogonalizes whole matrices and FSDP shards them; "
             "use parallel='ddp' or optimizer='adamw'")
        need(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        need(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.backend in BACKENDS, "backend", f"must be one of {BACKENDS}")
        need(self.parallel in dist_.PARALLEL, "parallel", f"must be one of {dist_.PARALLEL}")
        need(self.on_nonfinite in ("stop", "skip"), "on_nonfinite", "must be 'stop' or 'skip'")
        need(self.best_mode in ("min", "max"), "best_mode", "must be 'min' or 'max'")
        need(self.early_stopping_patience is None or (
            isinstance(self.early_stopping_patience, int) and self.early_stopping_patience >= 1),
            "early_stopping_patience", "must be a positive integer or None")
        need(self.peak_flops is None or self.peak_flops > 0, "peak_flops", "must be > 0 or None (estimated)")
        device = self.device.split(":")[0]
        need(device in ("auto", "cpu", "cuda", "mps"), "device", "must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")

    @property
    def decay_steps(self) -> int:
        return self.max_steps if self.lr_decay_steps is None else self.lr_decay_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a plain dict; unknown keys are an error that lists the valid ones."""
        reject_unknown_keys(cls, values)
        return cls(**values)


# Fields that may differ when a run is resumed; any other difference is an error.
RESUMABLE_FIELDS = frozenset({
    "out_dir", "max_steps", "eval_interval", "eval_steps", "log_interval", "checkpoint_interval", "keep_last",
    "device", "dtype", "compile", "backend", "parallel", "on_nonfinite", "max_consecutive_skips", "early_stopping_patience",
    "tensorboard", "progress", "peak_flops", "cpu_threads",
})


class Batches(Protocol):
    """A resumable source of training batches."""

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch, as CPU tensors; the loop moves them to the device."""

    def state_dict(self) -> dict:
        """Everything needed to continue from here (saved in each checkpoint)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`."""


@dataclass
class TrainResult:
    """What `train` returns (on every rank)."""

    step: int
    """Updates completed."""
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, mean loss of that update over the global batch), for every update."""
    evals: list[dict] = field(default_factory=list)
    """Each evaluation's metrics, with its 'step'."""
    best_metric: float | None = None
    """Best value of config.best_metric seen."""
    best_step: int | None = None
    """Step at which it was seen."""
    stopped_early: bool = False
    """Whether early stopping ended the run."""
    out_dir: Path | None = None
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None

    @property
    def val_losses(self) -> list[tuple[int, float]]:
        return [(e["step"], e["val_loss"]) for e in self.evals if "val_loss" in e]


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN or infinite (and on_nonfinite='stop')."""


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of update `step` (0-based): linear warm-up, then cosine decay to min_lr.

    Warm-up: lr * (step + 1) / warmup_steps for step < warmup_steps, so update 0 already
    learns and update warmup_steps - 1 uses lr. Then cosine from lr at warmup_steps to
    min_lr at decay_steps (Loshchilov & Hutter 2017, without restarts), min_lr after.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if step >= config.decay_steps:
        return config.min_lr
    progress = (step - config.warmup_steps) / (config.decay_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def language_model_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy; targets of -100 are ignored."""
    return model(batch["idx"], batch["targets"]).loss


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer | MuonWithAdamW:
    """The optimizer over the parameters that require grad; weight decay on matrices only.

    Biases and norm gains (dim < 2) never decay; embedding tables decay only with
    `decay_embeddings` (a tied LM head is the token embedding, so it follows that rule).
    With optimizer='muon', the matrices inside the transformer blocks (parameter names
    under 'blocks.', LoRA adapters excepted) get Muon updates and everything else AdamW's.
    """
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    hidden, decay, no_decay, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        matrix = p.dim() == 2 and id(p) not in embeddings
        in_block = name.startswith("blocks.") or ".blocks." in name
        if config.optimizer == "muon" and matrix and in_block and "lora_" not in name:  # adapters: AdamW
            hidden.append(p)
        elif p.dim() >= 2 and (config.decay_embeddings or id(p) not in embeddings):
            decay.append(p)
        else:
            no_decay.append(p)
    if not (hidden or decay or no_decay):
        raise ValueError("the model has no parameters with requires_grad=True; nothing to train")
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    betas = (config.beta1, config.beta2)
    if config.optimizer == "muon":
        muon = [{"params": hidden, "weight_decay": config.weight_decay, "muon": True}]
        return MuonWithAdamW(muon + groups, lr=config.lr, betas=betas)
    return torch.optim.AdamW(groups, lr=config.lr, betas=betas, fused=device.type == "cuda")


def _amp(device: torch.device, dtype: str) -> tuple[torch.dtype, bool]:
    """(autocast dtype, whether a GradScaler is needed)."""
    if dtype == "auto":
        if device.type == "cuda":
            return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
        return torch.float32, False
    resolved = getattr(torch, dtype)
    return resolved, resolved == torch.float16


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_new_model_field_default(key: str, value) -> bool:
    """Whether `key` ('model.<field>') is a GPTConfig field whose value is its default: a
    checkpoint written before the field existed behaved that way."""
    from minigpt.config import GPTConfig

    field = {f.name: f for f in dataclasses.fields(GPTConfig)}.get(key.removeprefix("model."))
    return field is not None and field.default is not dataclasses.MISSING and value == field.default


def _check_same_run(folder: Path, info: dict, config: TrainConfig, run_metadata: dict | None) -> None:
    """Resuming: the checkpoint's config must agree with this run's (RESUMABLE_FIELDS aside)."""
    # A field added to TrainConfig after the checkpoint was written had its default then.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    saved = {k: v for k, v in {**defaults, **info["train_config"]}.items() if k not in RESUMABLE_FIELDS}
    now = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_FIELDS}
    diffs = [f"train.{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    old, new = _flat(info.get("run_metadata") or {}), _flat(json.loads(json.dumps(run_metadata or {})))
    old = {**{k: v for k, v in new.items() if k.startswith("model.") and k not in old
              and _is_new_model_field_default(k, v)}, **old}
    diffs += [f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}"
              for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diffs:
        raise ValueError(
            f"cannot resume from {folder}: its config differs from this run's: " + "; ".join(diffs)
            + f". Use the original settings, or a new out_dir to start afresh (fields that may change: "
            f"{', '.join(sorted(RESUMABLE_FIELDS))})"
        )


class _State:
    """Loop counters that are saved with each checkpoint."""

    def __init__(self) -> None:
        self.step = 0
        self.train_losses: list[tuple[int, float]] = []
        self.evals: list[dict] = []
        self.best: float | None = None
        self.best_step: int | None = None
        self.evals_since_best = 0
        self.skipped = 0
        self.skipped_in_a_row = 0

    def to_dict(self) -> dict:
        return {"step": self.step, "train_losses": [list(x) for x in self.train_losses], "evals": self.evals,
                "best": self.best, "best_step": self.best_step, "evals_since_best": self.evals_since_best,
                "skipped": self.skipped, "skipped_in_a_row": self.skipped_in_a_row}

    def load(self, d: dict) -> None:
        self.step = d["step"]
        self.train_losses = [(int(s), float(v)) for s, v in d["train_losses"]]
        self.evals, self.best, self.best_step = d["evals"], d["best"], d["best_step"]
        self.evals_since_best, self.skipped = d["evals_since_best"], d["skipped"]
        self.skipped_in_a_row = d.get("skipped_in_a_row", 0)  # absent from older checkpoints


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

    Raises:
        ValueError: bad arguments, a checkpoint whose config or shapes disagree, no
            checkpoint that loads on resume, or a run folder in use or already holding a run
            (`RunFolderError`).
        NonFiniteLossError: the loss became NaN/inf and config.on_nonfinite == 'stop', or
            config.max_consecutive_skips updates in a row were skipped.
    """
    info = dist_.setup(config.device)
    parallel = dist_.resolve_parallel(config.parallel, info)
    if parallel == "fsdp" and save_model is not None:
        raise ValueError("save_model is not supported with parallel='fsdp'; the loop saves the gathered state_dict")
    if config.early_stopping_patience and eval_batches is None and extra_eval is None:
        raise ValueError("early_stopping_patience needs evaluations: pass eval_batches or extra_eval")
    with runfolder.claim(config.out_dir, resume=resume, overwrite=overwrite, is_main=info.is_main):
        return _train(model, config, train_batches, eval_batches, loss_fn, extra_eval, save_model, resume,
                      run_metadata, checkpoint_files, info, parallel)


def _train(model, config, train_batches, eval_batches, loss_fn, extra_eval, save_model, resume, run_metadata,
           checkpoint_files, info, parallel) -> TrainResult:
    device = dist_.resolve_device(config.device, info)
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    out_dir = Path(config.out_dir)
    root = out_dir / "checkpoints"
    state = _State()
    resume_from, saved = _find_resumable(root, model, config, run_metadata, info) if resume else (None, None)
    if resume and resume_from is None and info.is_main:
        logger.warning("resume=True but %s holds no checkpoint; starting from step 0", root)
    if info.is_main and root.is_dir():
        ckpt.clean_leftovers(root)
    if resume_from is None:
        _seed(config.seed + info.rank)

    raw = model.to(device)
    from minigpt.model import GPT

    for module in raw.modules():
        if isinstance(module, GPT):
            module.set_backend(config.backend)
    module = torch.compile(raw) if config.compile else raw
    module = dist_.wrap(module, parallel, device)
    optimizer = build_optimizer(raw, config, device)
    amp_dtype, needs_scaler = _amp(device, config.dtype)
    scaler = torch.amp.GradScaler(device.type) if needs_scaler else None
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype != torch.float32 else nullcontext())

    if resume_from is not None:
        _load_checkpoint(saved, raw, optimizer, scaler, train_batches, state, parallel, info)
        if info.is_main:
            logger.info("resumed from %s (step %d)", resume_from, state.step)
            if state.step >= config.max_steps:
                logger.warning("the checkpoint is at step %d, already at max_steps=%d: there is nothing to train; "
                               "raise --train.max_steps to continue the run", state.step, config.max_steps)

    trainable = [p for p in raw.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in {id(p): p for p in raw.parameters()}.values())
    n_train = sum(p.numel() for p in {id(p): p for p in trainable}.values())
    peak, peak_note = (config.peak_flops, "set by peak_flops") if config.peak_flops else peak_flops(device)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        logger.info("training %s parameters (%s trainable) on %s x %d (%s, %s), global batch %d x %d sequences",
                    f"{n_params:,}", f"{n_train:,}", device, info.world_size, str(amp_dtype).removeprefix("torch."),
                    parallel, info.world_size * config.grad_accum, config.batch_size)
        logger.info("MFU assumes a peak of %.3g FLOP/s per device: %s", peak, peak_note)
    metrics = MetricsLog(out_dir, state.step if resume_from else None, config.tensorboard, info.is_main)

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=config.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (config.progress and info.is_main))
    last_saved: Path | None = resume_from
    stopped_early = False
    window = {"time": 0.0, "tokens": 0, "losses": [], "flops": None}
    module.train()
    try:
        with logging_redirect_tqdm():
            while state.step < config.max_steps and not stopped_early:
                began = time.perf_counter()
                loss, grad_norm, tokens, seq_len = _update(
                    module, raw, optimizer, scaler, autocast, train_batches, loss_fn, trainable, config, device,
                    state.step, parallel)
                window["time"] += time.perf_counter() - began
                window["tokens"] += tokens * info.world_size
                if window["flops"] is None and seq_len:
                    window["flops"] = model_flops_per_token(raw, seq_len)
                state.step += 1
                bar.update(1)
                if loss is None:  # a non-finite update that was skipped
                    state.skipped += 1
                    state.skipped_in_a_row += 1
                    if state.skipped_in_a_row >= config.max_consecutive_skips:
                        raise NonFiniteLossError(
                            f"{state.skipped_in_a_row} updates in a row (steps {state.step - state.skipped_in_a_row + 1}"
                            f" to {state.step}) had a NaN/inf loss or gradient and were skipped "
                            f"(on_nonfinite='skip', max_consecutive_skips={config.max_consecutive_skips}); the "
                            f"model or data no longer yields finite values. Stopped without saving: the last "
                            f"checkpoint in {root} is intact. Lower lr, raise warmup_steps or check the data, then "
                            f"resume; or raise max_consecutive_skips")
                else:
                    state.skipped_in_a_row = 0
                    state.train_losses.append((state.step, loss))
                    window["losses"].append(loss)

                if state.step % config.log_interval == 0 or state.step == config.max_steps:
                    _log_train(window, state, config, peak, info, bar, metrics, grad_norm)

                improved = False
                if (eval_batches is not None or extra_eval is not None) and (
                        state.step % config.eval_interval == 0 or state.step == config.max_steps):
                    results = _evaluate(module, raw, eval_batches, loss_fn, extra_eval, config, device, autocast)
                    module.train()
                    improved = _record_eval(results, state, config, metrics, info)
                    if config.early_stopping_patience and state.evals_since_best >= config.early_stopping_patience:
                        stopped_early = True
                        if info.is_main:
                            logger.info("early stopping at step %d: %s has not improved for %d evaluations (best %.4f at step %d)",
                                        state.step, config.best_metric, state.evals_since_best, state.best, state.best_step)
                due = config.checkpoint_interval and state.step % config.checkpoint_interval == 0
                if due or improved or state.step == config.max_steps or stopped_early:
                    last_saved = _save_checkpoint(root, raw, optimizer, scaler, train_batches, state, config,
                                                  run_metadata, save_model, checkpoint_files, improved, parallel, info)
    finally:
        bar.close()
        metrics.close()
    best = ckpt.best_checkpoint(root)
    return TrainResult(step=state.step, train_losses=state.train_losses, evals=state.evals, best_metric=state.best,
                       best_step=state.best_step, stopped_early=stopped_early, out_dir=out_dir,
                       last_checkpoint=last_saved, best_checkpoint=best)


def _update(module, raw, optimizer, scaler, autocast, train_batches, loss_fn, trainable, config, device, step,
            parallel) -> tuple[float | None, float, int, int | None]:
    """One optimizer update: (mean loss or None if skipped, grad norm, tokens on this rank, T)."""
    lr = lr_at(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=device)
    tokens, seq_len = 0, None
    for micro in range(config.grad_accum):
        batch = {k: v.to(device, non_blocking=True) for k, v in train_batches.next_batch().items()}
        if "idx" in batch:
            tokens += batch["idx"].numel()
            seq_len = batch["idx"].shape[-1]
        last = micro == config.grad_accum - 1
        sync = nullcontext() if last or parallel != "ddp" else module.no_sync()
        with sync:
            with autocast:
                loss = loss_fn(module, batch)
            scaled = loss / config.grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach().float()
    mean_loss = dist_.all_reduce_mean(total / config.grad_accum).item()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip if config.grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    bad = None
    if not math.isfinite(mean_loss):
        bad = f"loss is {mean_loss}"
    elif scaler is None and not math.isfinite(grad_norm):
        bad = f"gradient norm is {grad_norm} (loss {mean_loss:.4f})"
    if bad is not None:
        optimizer.zero_grad(set_to_none=True)
        if config.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"{bad} at step {step + 1} (lr {lr:.3g}); stopped without saving, so the last checkpoint in "
                f"{Path(config.out_dir) / 'checkpoints'} is intact. Lower lr, raise warmup_steps, check the data, "
                f"or set on_nonfinite='skip' to skip such updates"
            )
        if scaler is not None:
            scaler.update()
        logger.warning("%s at step %d; skipped this update (on_nonfinite='skip')", bad, step + 1)
        return None, grad_norm, tokens, seq_len
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm, tokens, seq_len


def _log_train(window, state, config, peak, info, bar, metrics, grad_norm) -> None:
    tokens_per_s = window["tokens"] / window["time"] if window["time"] > 0 else 0.0
    mfu = window["flops"] * tokens_per_s / (peak * info.world_size) if window["flops"] else None
    loss = sum(window["losses"]) / len(window["losses"]) if window["losses"] else float("nan")
    lr = lr_at(state.step - 1, config)
    values = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu,
              "skipped": state.skipped}
    metrics.write("train", state.step, values)
    postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:,.0f}"}
    if mfu is not None:
        postfix["mfu"] = f"{100 * mfu:.1f}%"
    bar.set_postfix(postfix, refresh=False)
    window.update(time=0.0, tokens=0, losses=[])


@torch.no_grad()
def _evaluate(module, raw, eval_batches, loss_fn, extra_eval, config, device, autocast) -> dict[str, float]:
    module.eval()
    results: dict[str, float] = {}
    if eval_batches is not None:
        total, count = torch.zeros((), device=device), 0
        for i, batch in enumerate(eval_batches()):
            if i == config.eval_steps:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                total += loss_fn(module, batch).float()
            count += 1
        if count == 0:
            raise ValueError("eval_batches() yielded no batches")
        val_loss = dist_.all_reduce_mean(total / count).item()
        results["val_loss"] = val_loss
        results["val_ppl"] = math.exp(min(val_loss, 80.0))
    if extra_eval is not None:
        results.update({k: float(v) for k, v in extra_eval(raw).items()})
    return results


def _record_eval(results, state, config, metrics, info) -> bool:
    """Log one evaluation; return whether it is the best so far."""
    if config.best_metric not in results:
        raise ValueError(f"best_metric={config.best_metric!r} is not among the eval metrics {sorted(results)}")
    state.evals.append({"step": state.step, **results})
    metrics.write("eval", state.step, results)
    value = results[config.best_metric]
    better = state.best is None or (value < state.best if config.best_mode == "min" else value > state.best)
    if better and math.isfinite(value):
        state.best, state.best_step, state.evals_since_best = value, state.step, 0
    else:
        better = False
        state.evals_since_best += 1
    if info.is_main:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in results.items())
        logger.info("step %d: %s%s", state.step, shown, " (best)" if better else "")
    return better


def _save_checkpoint(root, raw, optimizer, scaler, train_batches, state, config, run_metadata, save_model,
                     checkpoint_files, best, parallel, info) -> Path:
    rng = dist_.all_gather_objects(_rng_state())  # every rank's dropout RNG, for exact resumption
    if parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(raw, options=options)
        optim_state = get_optimizer_state_dict(raw, optimizer, options=options)
    else:
        model_state, optim_state = None, optimizer.state_dict()
    folder = ckpt.step_dir(root, state.step)
    if info.is_main:
        def fill(tmp: Path) -> None:
            if model_state is not None:  # FSDP: the gathered full state, with config.json like any GPT
                ckpt.save_model_state(raw, tmp, model_state)
            elif save_model is not None:
                save_model(raw, tmp)
            else:
                ckpt.save_model_state(raw, tmp)
            if not ckpt.is_state_dict_file(tmp / ckpt.MODEL_FILE):
                ckpt.save_state_dict(raw.state_dict(), tmp / ckpt.RESUME_MODEL_FILE)
            for name, text in (checkpoint_files or {}).items():
                (tmp / name).write_text(text)
            torch.save({
                "step": state.step, "loop": state.to_dict(), "optimizer": optim_state,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng, "loader": train_batches.state_dict(), "world_size": info.world_size,
            }, tmp / ckpt.TRAINER_STATE)
            readable = {"step": state.step, "train_config": config.to_dict(), "run_metadata": run_metadata,
                        "world_size": info.world_size, "last_eval": state.evals[-1] if state.evals else None,
                        "best": {"metric": config.best_metric, "value": state.best, "step": state.best_step}}
            (tmp / ckpt.TRAINER_INFO).write_text(json.dumps(readable, indent=2) + "\n")

        ckpt.write_atomically(folder, fill)
        if best:
            ckpt.write_json_atomically(root / "best.json", {"dir": folder.name, "step": state.step,
                                                            "metric": config.best_metric, "value": state.best})
            ckpt.point(root, "best", folder)
        ckpt.point(root, "latest", folder)
        ckpt.prune(root, config.keep_last)
    dist_.barrier()
    return folder


def _find_resumable(root: Path, model: nn.Module, config: TrainConfig, run_metadata: dict | None,
                    info: dist_.DistInfo) -> tuple[Path | None, dict | None]:
    """(folder, its contents) of the newest checkpoint under `root` that reads whole.

    A damaged checkpoint (a truncated or empty file, bad trainer.json, a refused pickle) is
    skipped with a warning naming the file; the older ones are exact states too, so the run
    continues as if it had been interrupted there. A checkpoint that reads but does not fit
    this run (another config or shapes) is an error, not skipped. Raises ValueError listing
    every checkpoint tried when none reads.
    """
    found = ckpt.list_checkpoints(root)
    tried = []
    for folder in reversed(found):
        try:
            return folder, _read_checkpoint(folder, model, config, run_metadata)
        except BadFileError as err:  # CheckpointError, DamagedWeightsError, files.read_json's
            tried.append(f"{folder.name}: {err}")
            if info.is_main:
                logger.warning("cannot resume from %s: %s; trying the previous checkpoint", folder, err)
    if found:
        raise ValueError(
            f"cannot resume from {root}: none of its {len(found)} checkpoints loads ("
            + "; ".join(tried) + "). Restore a checkpoint from a backup, or start afresh with --overwrite "
            "(the old run is moved aside) or another out_dir")
    return None, None


def _read_checkpoint(folder: Path, model: nn.Module, config: TrainConfig, run_metadata: dict | None) -> dict:
    """Read and check everything in `folder` before anything is changed, so a damaged file
    (a BadFileError) leaves the model, optimizer and loader as they were."""
    saved = ckpt.read_trainer_info(folder)
    _check_same_run(folder, saved, config, run_metadata)
    weights = folder / ckpt.RESUME_MODEL_FILE
    if not weights.is_file():
        weights = folder / ckpt.MODEL_FILE
    model_state = ckpt.load_state_dict_file(weights)
    ckpt.check_state_dict(model, model_state, folder)
    trainer = ckpt.read_trainer_state(folder)
    for key in ("loop", "optimizer", "rng", "loader"):
        if key not in trainer:
            raise ckpt.CheckpointError(f"{folder / ckpt.TRAINER_STATE} has no {key!r} entry; it is damaged")
    return {"model": model_state, "trainer": trainer}


def _load_checkpoint(saved, raw, optimizer, scaler, train_batches, state, parallel, info) -> None:
    model_state, trainer = saved["model"], saved["trainer"]
    if parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(raw, model_state, options=options)
        set_optimizer_state_dict(raw, optimizer, trainer["optimizer"], options=options)
    else:
        raw.load_state_dict(model_state)
        optimizer.load_state_dict(trainer["optimizer"])
    if scaler is not None and trainer.get("scaler") is not None:
        scaler.load_state_dict(trainer["scaler"])
    train_batches.load_state_dict(trainer["loader"])
    rng = trainer["rng"]
    _set_rng_state(rng[info.rank] if len(rng) == info.world_size else rng[0])
    state.load(trainer["loop"])
