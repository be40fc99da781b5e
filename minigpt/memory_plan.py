"""Memory per rank of a training step on a device mesh, computed from a config alone.

`memory_plan(config, mesh, batch_size, seq_len, dtype, activation_checkpointing)` is what
``minigpt inspect PRESET --mesh dp_shard=N,tp=M`` prints (`format_memory_plan`, or
``--json``). It models the layout `minigpt.train.parallel` builds, after torchtitan and
Megatron-LM: a mesh of degrees (dp_replicate, dp_shard, tp), whose product is the world size
(`minigpt.train.mesh.MeshShape`), and it is checked against the peaks torch's allocation
trackers measure on every layout (benchmarks/results/memory_plan_cpu.md).

- Tensor parallelism over tp (Megatron-LM, Shoeybi et al. 2019): the fused qkv and the
  MLP's first projection are column-sharded, the attention output projection and the MLP's
  second projection row-sharded; the token embedding (and the LM head tied to it) is
  sharded along the vocabulary, the position embedding along the positions. The
  row-parallel biases and the LayerNorms are replicated.
- Sequence parallelism with tp (Korthikanti et al. 2022, "Reducing Activation Recomputation
  in Large Transformer Models"): what lives outside attention and the MLP (the residual
  stream, LayerNorm inputs, dropout masks) is split along the sequence, and inside them each
  rank holds its heads' or its MLP columns' share, so nearly every stored activation is
  divided by tp, except the LayerNorm outputs, which the column-parallel matmuls save as
  gathered, whole; the loss is vocabulary-parallel (logits split by tp).
- FSDP2 (`fully_shard` per block, then the root) over dp_shard: every parameter, its
  gradient and AdamW's two moments are split along dim 0 into dp_shard chunks (the chunk
  is rounded up, as FSDP2 pads it); dp_replicate holds full replicas (HSDP) and changes
  nothing per rank.

What is stored follows what minigpt's model saves for backward, not a textbook constant:
see `activation_parts`. Every number is bytes on the rank that holds the most (rank 0,
whose chunks are the rounded-up ones).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from minigpt.counts import ModelShape, _check_backend, _seq_len
from minigpt.train.mesh import DIM_NAMES as MESH_DIMS
from minigpt.train.mesh import MeshShape


TRAIN_DTYPES = ("fp32", "bf16")
"""Training precisions: plain float32, or bfloat16 autocast over float32 master weights
(what `minigpt.train.parallel.mixed_precision` sets up for dtype='bfloat16')."""

GIB = 2**30


def parse_mesh(text: str) -> MeshShape:
    """'dp_shard=8,tp=2' -> MeshShape(dp_replicate=1, dp_shard=8, tp=2); a missing degree is 1.

    Raises ValueError for a part that is not key=value, an unknown or repeated key, or a
    degree that is not a positive integer; the message names the valid form.
    """
    form = "write --mesh as comma-separated key=value pairs, e.g. dp_shard=8,tp=2 (keys: " + ", ".join(MESH_DIMS) + ")"
    degrees: dict[str, int] = {}
    for part in text.split(","):
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq or not key:
            raise ValueError(f"mesh part {part.strip()!r} is not key=value; {form}")
        if key not in MESH_DIMS:
            raise ValueError(f"mesh key {key!r} is unknown; {form}")
        if key in degrees:
            raise ValueError(f"mesh key {key!r} is given twice; give each degree once")
        try:
            degree = int(value)
        except ValueError:
            raise ValueError(f"mesh {key}={value!r} must be a positive integer; e.g. {key}=2") from None
        if degree < 1:
            raise ValueError(f"mesh {key}={degree} must be a positive integer (1 means that dimension is not used)")
        degrees[key] = degree
    return MeshShape(**degrees)


def check_mesh(config: ModelShape, mesh: MeshShape, seq_len: int | None = None) -> None:
    """Raise ValueError unless tp splits what the training loop splits: whole heads and
    equal MLP columns per rank (`MeshShape.check_model`, the loop's own check) and, with
    sequence parallelism, seq_len (positions per rank). The vocabulary may split unevenly
    (rank 0 holds the rounded-up share). Each message names the fix."""
    if mesh.tp == 1:
        return
    mesh.check_model(config.n_head, config.mlp_width)
    if seq_len is not None and seq_len % mesh.tp:
        raise ValueError(f"seq_len={seq_len} must be a multiple of mesh tp={mesh.tp} (sequence parallelism splits the "
                         f"positions); use seq_len={-(-seq_len // mesh.tp) * mesh.tp}")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank of one training step (see `memory_plan`)."""

    mesh: MeshShape
    batch_size: int
    seq_len: int
    dtype: str
    activation_checkpointing: bool
    backend: str
    params: int
    """Parameter shards, float32 (autocast keeps float32 master weights)."""
    gradients: int
    """Gradient shards, float32, as many as the parameters."""
    optimizer: int
    """AdamW's exp_avg and exp_avg_sq, float32, two per parameter."""
    activations: int
    """What the forward keeps for backward, with the loss's log-softmax and its two gradients
    (and the autocast weight casts, see `activation_parts`): the peak of the activations."""
    recompute: int
    """With activation checkpointing, one block's activations, live again while the block is
    recomputed (the first block last, when the gradients exist); 0 without."""
    gathered: int
    """FSDP2's unsharded parameters: the root's and two blocks' (current and prefetched), in
    the compute dtype. 0 without dp_shard."""
    activation_parts: dict[str, int]
    """`activations` by part (see `activation_parts`)."""
    gathered_gradients: int = 0
    """FSDP2's unsharded float32 gradients before their reduce-scatter: the root's and one
    block's; they exist only in the backward pass. 0 without dp_shard."""

    @property
    def total(self) -> int:
        """The step's peak: parameters, AdamW state and FSDP's unsharded copies throughout, plus
        the larger of the two moments that compete for the rest. At the start of the backward
        pass the activations are all there and no gradient is (zero_grad sets them to None); at
        its end every gradient is there and, with checkpointing, the first block's recomputed
        activations, and FSDP2's unsharded gradients. (Every part at once would overstate the
        tracked CPU peaks by about the gradients: up to 19 %, benchmarks/results/memory_plan_cpu.md.)"""
        return self.params + self.optimizer + self.gathered + max(
            self.activations, self.gradients + self.recompute + self.gathered_gradients)

    def fits(self, gpu_memory_gib: float) -> bool:
        """Whether `total` is at most `gpu_memory_gib` GiB (nothing left for the CUDA context,
        communication buffers or allocator fragmentation: leave a few GiB)."""
        return self.total <= gpu_memory_gib * GIB

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mesh"] = {**dataclasses.asdict(self.mesh), "world_size": self.mesh.world_size}
        out["total"] = self.total
        return out


def param_shard_numel(config: ModelShape, mesh: MeshShape) -> int:
    """Parameters on one rank: each tensor's tensor-parallel shard (see the module docstring),
    then FSDP2's dim-0 chunk of it, rounded up (rank 0's chunk, the largest)."""
    return sum(_fsdp_chunk(shape, mesh.dp_shard) for shape in _local_shapes(config, mesh.tp).values())


def memory_plan(
    config: ModelShape, mesh: MeshShape, batch_size: int, seq_len: int | None = None, dtype: str = "bf16",
    activation_checkpointing: bool = False, backend: str = "sdpa", autocast_cache: bool = True,
) -> MemoryPlan:
    """Bytes per rank of one AdamW training step of `batch_size` sequences of `seq_len`
    tokens (default block_size) per data-parallel rank (the tp ranks of a group share them).

    dtype: 'fp32', or 'bf16' for bfloat16 autocast over float32 master weights, gradients
    and moments (activations partly bf16: see `activation_parts`).
    activation_checkpointing: each block keeps only its input; one block is recomputed at
    a time (`minigpt.train.parallel`'s per-block checkpointing).
    backend: the attention backend ('sdpa' and 'triton' keep O(T) per head, 'math' the
    T x context probabilities).
    autocast_cache: whether bf16 autocast keeps its weight casts until the forward ends, as
    `minigpt.train.parallel.mixed_precision`'s torch.autocast does (see `activation_parts`).

    Raises ValueError for a bad mesh for this config (`check_mesh`), batch_size < 1,
    seq_len outside [1, block_size], an unknown dtype or backend.
    """
    T = _seq_len(config, seq_len)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer (sequences per data-parallel rank)")
    if dtype not in TRAIN_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {TRAIN_DTYPES} "
                         f"(bf16 means autocast over float32 master weights)")
    _check_backend(backend)
    check_mesh(config, mesh, T)
    n = param_shard_numel(config, mesh)
    parts = activation_parts(config, mesh.tp, batch_size, T, dtype, activation_checkpointing, backend, autocast_cache,
                             fsdp_mixed_precision=mesh.dp_size > 1)
    recompute = parts.pop("recompute", 0)
    return MemoryPlan(
        mesh=mesh, batch_size=batch_size, seq_len=T, dtype=dtype, activation_checkpointing=activation_checkpointing,
        backend=backend, params=4 * n, gradients=4 * n, optimizer=8 * n,
        activations=sum(parts.values()), recompute=recompute, gathered=_gathered_bytes(config, mesh, dtype)[0], activation_parts=parts,
        gathered_gradients=_gathered_bytes(config, mesh, dtype)[1],
    )


def activation_parts(config: ModelShape, tp: int, batch_size: int, seq_len: int, dtype: str,
                     activation_checkpointing: bool, backend: str = "sdpa",
                     autocast_cache: bool = True, fsdp_mixed_precision: bool = False) -> dict[str, int]:
    """Activation bytes per rank at their peak (the start of the backward pass), by part, and
    with checkpointing 'recompute': one block's, live while it is recomputed.

    What one of minigpt's blocks keeps for backward, per token (a = 4 bytes in fp32, 2 under
    bf16 autocast; the residual stream and LayerNorm stay float32 under autocast, and a
    matmul saves the bf16 copy of its input):

    - the residual stream entering each branch (ln_1's and ln_2's inputs): 2 x 4C;
    - the matmul inputs: ln_1 and ln_2 outputs 2 x aC, the fused qkv output 3aC (q, k, v
      are views of it, kept by attention), the attention output aC (the projection's input;
      the backends write it in (B, T, H, D) order, so the reshape is a view), the MLP's fc
      output and GELU output 2 x a * mlp_width;
    - LayerNorm mean and rstd (2 x 2 x 4 bytes) and attention's log-sum-exp (4H);
    - the math backend's float32 softmax output 4H x context, and its bf16 copy under autocast;
    - with dropout > 0, 1-byte masks after attention and the MLP (the math backend's
      attention dropout: a mask and the dropped copy of the probabilities; not measured, the
      benchmark trains without dropout);
    - under bf16 autocast without FSDP2, the bf16 copies of the block's four weight matrices
      (and their biases) that the matmuls save, of the tp shard (with FSDP2, see
      `fsdp_mixed_precision` below).

    That is 16C floats per token and layer in fp32 with mlp_width = 4C (Korthikanti et al.'s
    34 bytes of 16-bit activations per sbh include the dropout masks and a separate
    reshape copy that minigpt does not make). With tp, every part but the LayerNorm outputs
    is divided by tp (sequence parallelism outside the branches, heads or columns inside
    them, after Korthikanti et al.; the gathered LayerNorm outputs, measured).

    After the blocks: ln_f's input and output (the output gathered whole under tp), the bf16
    head weight under autocast, and the loss: its float32 log-softmax (B, T, V / tp) kept for
    backward and, at the peak, two float32 gradients of that size (of the log-softmax and of
    the logits), 12 B T V bytes in one process; torch's `loss_parallel` holds a fourth,
    16 B T V / tp (measured).

    With activation checkpointing each block keeps its input (4C per token, float32); one
    block's activations live again while it is recomputed, after the loss's tensors are
    gone ('recompute', which `MemoryPlan.total` sets against the gradients). Under bf16
    autocast the bf16 weight copies still pile up: torch.autocast caches the cast of every
    parameter (FSDP2's gathered ones included) until the autocast region ends with the
    forward ('autocast weight copies'; measured on CPU, one process and FSDP2). They are
    counted with the loss's tensors, which come after them, as a bound.
    `autocast_cache=False` leaves them out: the plan of ``torch.autocast(cache_enabled=False)``.

    `fsdp_mixed_precision`: FSDP2 gathers the parameters in bf16 itself
    (MixedPrecisionPolicy(param_dtype=bfloat16), what `minigpt.train.parallel` sets under
    bf16 whenever FSDP2 shards), so the matmuls save those gathered copies, which FSDP2 frees
    after each block's forward and gathers again for its backward: no weight copies stay
    (the transient ones are among `_gathered_bytes`).
    """
    C, H, M, L = config.n_embd, config.n_head, config.mlp_width, config.n_layer
    a = 4 if dtype == "fp32" else 2
    linear = sum(math.prod(s) for k, s in _local_shapes(config, tp).items() if k.startswith(("blocks.0.attn.",
                                                                                          "blocks.0.mlp.")))
    weight_copies = 2 * linear if a == 2 and not fsdp_mixed_precision else 0  # one block's bf16 weights, unsharded
    tokens = batch_size * seq_len
    dropout = getattr(config, "dropout", 0.0) > 0

    # Under tensor parallelism the column-parallel matmuls save their input as sequence
    # parallelism gathered it, whole: ln_1's and ln_2's outputs (and ln_f's, for the head) are
    # not divided by tp (measured, benchmarks/results/memory_plan_cpu.md).
    gathered_norm_outputs = a * 2 * C

    def block(layer: int) -> int:
        per_token = 2 * 4 * C + a * (3 * C + C + 2 * M) + 2 * 2 * 4 + 4 * H
        if backend == "math":
            from minigpt.counts import computed_attention_context

            context = computed_attention_context(config, seq_len, layer, backend)
            per_token += round(H * context * (4 + (2 if a == 2 else 0) + ((1 + a) if dropout else 0)))
        if dropout:
            per_token += 2 * C
        return tokens * per_token // tp + tokens * gathered_norm_outputs + weight_copies

    head_input = tokens * (4 * C + 2 * 4) // tp + tokens * a * C + (2 * config.vocab_size * C // tp if a == 2 else 0)
    # The loss's float32 (B, T, V / tp) tensors at its backward's peak: the log-softmax and two
    # gradients; torch's vocabulary-parallel cross-entropy (`loss_parallel`) holds a fourth.
    loss = (12 if tp == 1 else 16) * tokens * -(-config.vocab_size // tp)
    embedding = tokens * C // tp if dropout else 0  # the embedding dropout's mask
    if not activation_checkpointing:
        return {"blocks": sum(block(i) for i in range(L)), "head and loss": head_input + loss + embedding}
    parts = {"block inputs": L * tokens * 4 * C // tp, "head and loss": head_input + loss + embedding}
    if a == 2 and autocast_cache and weight_copies:
        parts["autocast weight copies"] = L * weight_copies
    return {**parts, "recompute": max(block(i) for i in range(L))}


def smallest_mesh(config: ModelShape, gpu_memory_gib: float, batch_size: int, seq_len: int | None = None,
                  dtype: str = "bf16", activation_checkpointing: bool = True, backend: str = "sdpa",
                  autocast_cache: bool = True, max_world_size: int = 4096, max_tp: int = 8) -> MemoryPlan | None:
    """The plan of the smallest world size (then the smallest tp) whose rank fits in
    `gpu_memory_gib`, over meshes (dp_shard, tp) with tp <= max_tp (one node's NVLink domain)
    that `check_mesh` accepts; None when none up to max_world_size fits. dp_replicate is
    never needed: replicas add no memory and save none."""
    T = _seq_len(config, seq_len)
    for world in range(1, max_world_size + 1):
        for tp in range(1, min(max_tp, world) + 1):
            if world % tp:
                continue
            mesh = MeshShape(dp_shard=world // tp, tp=tp)
            try:
                check_mesh(config, mesh, T)
            except ValueError:
                continue
            plan = memory_plan(config, mesh, batch_size, T, dtype, activation_checkpointing, backend, autocast_cache)
            if plan.fits(gpu_memory_gib):
                return plan
    return None


def format_memory_plan(plans: list[MemoryPlan], gpu_memory_gib: float, name: str | None = None) -> str:
    """A table of `plans` side by side (e.g. without and with activation checkpointing)."""
    from minigpt.report import text_table

    first = plans[0]
    m = first.mesh
    lines = [
        f"{name or 'config'}: memory per rank, mesh {m} (world size {m.world_size}), batch {first.batch_size} "
        f"per data-parallel rank x T={first.seq_len}, {_dtype_words(first.dtype)}, AdamW, backend={first.backend}",
        "",
    ]
    header = ["Per rank"] + ["checkpointing" if p.activation_checkpointing else "no checkpointing" for p in plans]
    rows = [header]
    rows.append(["  parameters (fp32 shards)", *(_gib(p.params) for p in plans)])
    rows.append(["  gradients (fp32 shards)", *(_gib(p.gradients) for p in plans)])
    rows.append(["  AdamW state (m, v: fp32 shards)", *(_gib(p.optimizer) for p in plans)])
    rows.append(["  activations", *(_gib(p.activations) for p in plans)])
    for key in dict.fromkeys(k for p in plans for k in p.activation_parts):
        rows.append([f"    {key}", *(_gib(p.activation_parts[key]) if key in p.activation_parts else "" for p in plans)])
    rows.append(["  one block recomputed", *(_gib(p.recompute) if p.activation_checkpointing else "" for p in plans)])
    rows.append(["  FSDP unsharded copies", *(_gib(p.gathered + p.gathered_gradients) for p in plans)])
    rows.append(["  peak", *(_gib(p.total) for p in plans)])
    rows.append([f"  fits {gpu_memory_gib:g} GiB", *(("yes" if p.fits(gpu_memory_gib) else "no") for p in plans)])
    lines += text_table(rows, right=set(range(1, len(header))))
    lines += ["", "  activations: what the forward keeps for backward, with the loss's logits and gradients (and under "
              "bf16 autocast with checkpointing, the weight casts autocast caches until the forward ends)",
              "  peak = parameters + AdamW + FSDP copies + the larger of: activations, or gradients + one block "
              "recomputed", "  (no allowance for the CUDA context, communication buffers or "
              "allocator fragmentation: leave a few GiB)"]
    return "\n".join(lines)


def memory_plan_json(plans: list[MemoryPlan], gpu_memory_gib: float, name: str | None = None) -> str:
    """`plans` as JSON, each with its `fits` verdict for `gpu_memory_gib`."""
    return json.dumps({
        "name": name, "gpu_memory_gib": gpu_memory_gib,
        "plans": [{**p.to_dict(), "fits": p.fits(gpu_memory_gib)} for p in plans],
    }, indent=2)


# Building blocks ------------------------------------------------------------


def _local_shapes(config: ModelShape, tp: int) -> dict[str, tuple[int, ...]]:
    """Each parameter's tensor-parallel shard shape, keyed by the name in `model.GPT`."""
    C, M, V = config.n_embd, config.mlp_width, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "tok_emb.weight": (-(-V // tp), C),  # vocabulary-parallel (rank 0's share, rounded up)
        "pos_emb.weight": (-(-config.block_size // tp), C),  # split along the positions
    }
    norm = {"weight": (C,), **({"bias": (C,)} if config.bias else {})}
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            shapes.update({f"{p}{ln}.{k}": s for k, s in norm.items()})  # replicated
        shapes[f"{p}attn.qkv.weight"] = (3 * C // tp, C)  # column-parallel
        if config.qkv_bias:
            shapes[f"{p}attn.qkv.bias"] = (3 * C // tp,)
        shapes[f"{p}attn.proj.weight"] = (C, C // tp)  # row-parallel; its bias is replicated
        shapes[f"{p}mlp.fc.weight"] = (M // tp, C)  # column-parallel
        shapes[f"{p}mlp.proj.weight"] = (C, M // tp)  # row-parallel
        if config.bias:
            shapes[f"{p}attn.proj.bias"] = (C,)
            shapes[f"{p}mlp.fc.bias"] = (M // tp,)
            shapes[f"{p}mlp.proj.bias"] = (C,)
    shapes.update({f"ln_f.{k}": s for k, s in norm.items()})
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (-(-V // tp), C)
    return shapes


def _fsdp_chunk(shape: tuple[int, ...], dp_shard: int) -> int:
    """Elements of FSDP2's dim-0 chunk on rank 0: ceil(rows / dp_shard) rows."""
    return -(-shape[0] // dp_shard) * math.prod(shape[1:])


def _gathered_bytes(config: ModelShape, mesh: MeshShape, dtype: str = "fp32") -> tuple[int, int]:
    """FSDP2's unsharded working copies (0 when dp_shard is 1): the root module's
    parameters (embeddings, ln_f, an untied head), which FSDP2 keeps unsharded from forward
    to backward, and their gradient (the tied embedding's arrives with the head's backward
    and is reduce-scattered last), plus two blocks' parameters (the one running and the one
    prefetched) and one block's gradients before their reduce-scatter."""
    if mesh.dp_shard == 1:
        return 0, 0
    shapes = _local_shapes(config, mesh.tp)
    root = sum(math.prod(s) for k, s in shapes.items() if not k.startswith("blocks."))
    block = sum(math.prod(s) for k, s in shapes.items() if k.startswith("blocks.0."))
    # Parameters are gathered in the compute dtype (FSDP2's MixedPrecisionPolicy under bf16);
    # gradients are reduced in float32.
    return (2 if dtype == "bf16" else 4) * (root + 2 * block), 4 * (root + block)


def _divisors(n: int, also: int | None = None) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0 and (also is None or also % d == 0)]


def _dtype_words(dtype: str) -> str:
    return "fp32" if dtype == "fp32" else "bf16 autocast (fp32 master weights)"


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 2**20:.1f} MiB"


def plan_report(source: str, mesh: str | MeshShape, batch_size: int = 1, seq_len: int | None = None,
                dtype: str = "bf16", gpu_memory_gib: float = 80.0, backend: str = "sdpa",
                as_json: bool = False) -> str:
    """What ``minigpt inspect SOURCE --mesh ...`` prints: the plans without and with
    activation checkpointing, side by side (JSON with `as_json`).

    source: a preset, a config JSON file or a model folder (`minigpt.report.load_config`).
    mesh: a `MeshShape` or its text, e.g. 'dp_shard=8,tp=2' (`parse_mesh`).
    Raises ValueError for a bad source, mesh, size or gpu_memory_gib <= 0.
    """
    from minigpt.report import GPT3_FAMILY, load_config

    if source == GPT3_FAMILY:
        raise ValueError(f"--mesh plans one model; '{GPT3_FAMILY}' is the family table: name a preset, "
                         f"e.g. gpt3-175b")
    if isinstance(gpu_memory_gib, bool) or not isinstance(gpu_memory_gib, (int, float)) or not gpu_memory_gib > 0:
        raise ValueError(f"gpu_memory_gib={gpu_memory_gib!r} must be a positive number of GiB, e.g. 80")
    name, config = load_config(source)
    mesh = parse_mesh(mesh) if isinstance(mesh, str) else mesh
    plans = [memory_plan(config, mesh, batch_size, seq_len, dtype, checkpointing, backend)
             for checkpointing in (False, True)]
    return memory_plan_json(plans, gpu_memory_gib, name) if as_json else format_memory_plan(plans, gpu_memory_gib, name)
