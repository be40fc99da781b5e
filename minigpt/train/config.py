"""The run config of the shared training loop: `TrainConfig`, one typed, validated field per knob.

Pretraining and fine-tuning both build one; `RESUMABLE_FIELDS` names those a resumed run
may change (everything else must match the checkpoint, minigpt.train.checkpoint).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from minigpt.config import reject_unknown_keys
from minigpt.ops import BACKENDS
from minigpt.train.distributed import PARALLEL
from minigpt.train.threads import CPU_PARALLEL
from minigpt.typed import PathStr, check_fields

DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "muon")
CHECKPOINT_FORMATS = ("auto", "full", "sharded")


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
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward instead of keeping them:
    less memory, about one more forward of compute; same losses and gradients."""
    backend: str = "sdpa"
    """Attention backend set on every GPT in the model: 'math', 'sdpa' or 'triton'."""
    parallel: str = "auto"
    """'auto' (DDP under torchrun; 'fsdp' when tp, dp_replicate or dp_shard is set), 'none', 'ddp', or
    'fsdp': FSDP2 over dp_shard (HSDP with dp_replicate) and tensor parallelism over tp (minigpt.train.mesh)."""
    dp_replicate: int = 1
    """Mesh: replicas of the sharded model, each reading its own data (HSDP's outer dimension)."""
    dp_shard: int = -1
    """Mesh: ranks FSDP2 shards parameters, gradients and optimizer state over; -1 takes the ranks
    that dp_replicate and tp leave."""
    tp: int = 1
    """Mesh: tensor-parallel degree; each block's matrices split across this many ranks (Megatron-LM),
    with sequence parallelism and a loss-parallel head. Must divide n_head and the MLP width."""
    checkpoint_format: str = "auto"
    """'full': one safetensors model folder gathered on rank 0; 'sharded': every rank writes its own
    shards (torch.distributed.checkpoint), resumable on another mesh, `minigpt export` makes a model
    folder of it; 'auto' is 'sharded' under tensor parallelism and 'full' otherwise."""
    on_nonfinite: str = "stop"
    """A NaN/inf loss or gradient: 'stop' with an error naming the step, or 'skip' the update.
    'stop' checks at log, eval and checkpoint steps (no device sync in between: a GPU may run up
    to log_interval-1 updates past the bad one, and nothing from them is saved); 'skip' must
    decide before each optimizer step, so it costs one device sync per update."""
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
    cpu_parallel: str = "ops"
    """How a CPU run uses its threads (cpu_threads, or torch's default of one per core): 'ops' splits
    every operation across them (torch's way); 'micro_batches' runs up to that many of an update's
    grad_accum micro-batches at once, one whole micro-batch per thread, for models whose operations
    are too small to split well (minigpt.train.threads; the same update as one thread computes;
    the memory of one micro-batch's activations and gradients per thread)."""

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
        need(self.parallel in PARALLEL, "parallel", f"must be one of {PARALLEL}")
        need(self.cpu_parallel in CPU_PARALLEL, "cpu_parallel", f"must be one of {CPU_PARALLEL}")
        for name in ("dp_replicate", "tp"):
            need(is_int(name) and getattr(self, name) >= 1, name, "must be a positive integer")
        need(is_int("dp_shard") and (self.dp_shard >= 1 or self.dp_shard == -1), "dp_shard",
             "must be a positive integer, or -1 for the ranks that dp_replicate and tp leave")
        need(not (self.parallel == "ddp" and (self.tp > 1 or self.dp_replicate > 1 or self.dp_shard > 1)), "parallel",
             f"'ddp' cannot use a mesh (tp={self.tp}, dp_replicate={self.dp_replicate}, dp_shard={self.dp_shard}): "
             f"DDP replicates the whole model; use parallel='fsdp' (or 'auto') for a device mesh")
        need(not (self.optimizer == "muon" and self.tp > 1), "optimizer",
             "cannot be used with tp > 1: Muon orthogonalizes whole matrices and tensor parallelism splits them; "
             "use optimizer='adamw'")
        need(self.checkpoint_format in CHECKPOINT_FORMATS, "checkpoint_format", f"must be one of {CHECKPOINT_FORMATS}")
        need(not (self.tp > 1 and self.compile and self.activation_checkpointing), "compile",
             "with tp > 1 and activation_checkpointing cannot be used together: torch (2.13) fails to compile a "
             "checkpointed block whose tensors are split by tensor parallelism; keep one of compile and "
             "activation_checkpointing")
        need(self.on_nonfinite in ("stop", "skip"), "on_nonfinite", "must be 'stop' or 'skip'")
        need(self.best_mode in ("min", "max"), "best_mode", "must be 'min' or 'max'")
        need(self.early_stopping_patience is None or (
            isinstance(self.early_stopping_patience, int) and self.early_stopping_patience >= 1),
            "early_stopping_patience", "must be a positive integer or None")
        need(self.peak_flops is None or self.peak_flops > 0, "peak_flops", "must be > 0 or None (estimated)")
        device = self.device.split(":")[0]
        need(device in ("auto", "cpu", "cuda", "mps"), "device", "must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")

    @property
    def uses_mesh(self) -> bool:
        """Whether a degree of the device mesh is set (then 'auto' means FSDP2 over it)."""
        return self.tp > 1 or self.dp_replicate > 1 or self.dp_shard > 1

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
    "tensorboard", "progress", "peak_flops", "cpu_threads", "cpu_parallel", "activation_checkpointing",
    # Another mesh reads the same global batch (the loaders check it) and reshards the checkpoint.
    "batch_size", "dp_replicate", "dp_shard", "tp", "checkpoint_format",
})

