"""How the model is run, applied from outside it, in one function: `parallelize`.

In order (torchtitan's: tensor parallelism, then per-block transforms, then sharding): the
attention backend on every GPT, tensor parallelism over the mesh's 'tp' dimension,
activation checkpointing per transformer block, torch.compile per transformer block, then
DDP, or FSDP2 (`fully_shard` per block, then the root) over the mesh's data-parallel
dimensions (HSDP when dp_replicate > 1). The model itself stays single-device and knows none of this.

Tensor parallelism (Megatron-LM, Shoeybi et al. 2019; sequence parallelism, Korthikanti et
al. 2022) uses torch's own `parallelize_module`:

    tok_emb, pos_emb   rows (vocabulary, positions) split; output split along the sequence
    ln_1, ln_2, ln_f   sequence parallel: each rank normalises its share of the positions
    attn, mlp          input gathered along the sequence (all-gather) on entry
    attn.qkv.{q,k,v}   columns split: each rank computes whole heads, n_head / tp of them
    mlp.fc             columns split
    attn.proj, mlp.proj  rows split; output reduce-scattered along the sequence
    lm_head            columns (vocabulary) split, the logits left sharded for a loss-parallel
                       cross-entropy (`loss_parallel`), so no rank holds (B, T, V) whole

The fused qkv projection cannot be split by columns without mixing q, k and v across ranks,
so on the mesh path (parallel='fsdp') it is replaced by three projections holding the same
rows (`QKVColumns`); `fuse_qkv` / `split_qkv` translate state dicts between the two
spellings, so every checkpoint and model folder keeps the single-device names. The tied
head and token embedding are split the same way (rows of one (V, C) matrix) and re-tied
after distribution.

Compiling each block rather than the whole model is torchtitan's choice too: every block
of a kind reuses one compiled graph, so compiling costs about one block instead of all of
them (GPT-2 124M's training step on a 2-core CPU, an empty inductor cache: 28 s before the
first update instead of 71 s, benchmarks/NOTES.md), while the blocks hold nearly all of the FLOPs.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minigpt.ops import use_backend
from minigpt.train.config import TrainConfig
from minigpt.train.mesh import MeshShape

@contextmanager
def parallelize(model: nn.Module, config: TrainConfig, parallel: str, device: torch.device,
                mesh: MeshShape | None = None, compute_dtype: torch.dtype = torch.float32) -> Iterator[nn.Module]:
    """Yield the module to train on `model` (already on `device`): `model` itself, under DDP,
    or, with parallel='fsdp', split by tensor parallelism over `mesh`'s tp ranks and sharded
    in place by FSDP2 over its data-parallel ranks; after setting config.backend on every GPT
    and, with config.activation_checkpointing, checkpointing each transformer block, and with
    config.compile, compiling each transformer block in place (`nn.Module.compile`).

    Without a mesh the model's own modules, parameters and state_dict keys are unchanged;
    checkpointing and compiling are undone on exit, so the caller gets back the model it
    passed (sampling from it afterwards runs eagerly, without recompiling for the KV cache's
    shapes). On the mesh path the model stays distributed. Under a 16-bit `compute_dtype`
    FSDP2 gathers the parameters in that dtype (MixedPrecisionPolicy, gradients reduced in
    float32, as torchtitan does): the copies autocast would make of every gathered block
    would otherwise stay alive, saved for backward, and hold the whole model in 16 bits on every rank.
    """
    use_backend(model, config.backend)
    device_mesh = None
    if parallel == "fsdp":
        mesh = mesh or MeshShape(dp_shard=torch.distributed.get_world_size())
        device_mesh = mesh.build(device.type)
        split_fused_qkv(model)
        if mesh.tp > 1:
            apply_tensor_parallel(model, device_mesh["tp"])
    blocks = _blocks(model)
    for block in blocks:
        if config.activation_checkpointing:
            block.forward = functools.partial(_checkpointed_forward, block)
        if config.compile:
            block.compile()
    try:
        yield _wrap(model, parallel, device, device_mesh, compute_dtype)
    finally:
        for block in blocks:
            if config.activation_checkpointing:
                del block.forward  # the instance attribute; the class's forward shows through again
            if config.compile:
                block._compiled_call_impl = None  # what nn.Module.compile set: calls run eagerly again


class QKVColumns(nn.Module):
    """The fused `attn.qkv` projection as three (q, k and v, each C -> C), whose outputs are
    concatenated as the fused one's are; under tensor parallelism each is split by columns,
    so a rank's output is its heads' q, then k, then v, as the attention expects."""

    def __init__(self, fused: nn.Linear) -> None:
        super().__init__()
        width = fused.out_features // 3
        bias = fused.bias is not None
        factory = {"device": fused.weight.device, "dtype": fused.weight.dtype}
        self.q, self.k, self.v = (type(fused)(fused.in_features, width, bias=bias, **factory) for _ in range(3))
        with torch.no_grad():
            for i, part in enumerate((self.q, self.k, self.v)):
                part.weight.copy_(fused.weight[i * width:(i + 1) * width])
                part.weight.requires_grad_(fused.weight.requires_grad)
                if bias:
                    part.bias.copy_(fused.bias[i * width:(i + 1) * width])
                    part.bias.requires_grad_(fused.bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)  # (B, T, 3 x this rank's H x D)

    @property
    def weight(self) -> torch.Tensor:
        """The fused (3C, C) matrix, for code that reads it (the per-head hook paths)."""
        return torch.cat([self.q.weight, self.k.weight, self.v.weight])

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.q.bias is None else torch.cat([self.q.bias, self.k.bias, self.v.bias])


def split_fused_qkv(model: nn.Module) -> None:
    """Replace each plain attn.qkv projection (the model's `Linear`) of `model` by its
    `QKVColumns` (a LoRA-wrapped one stays fused: tensor parallelism refuses LoRA, see
    `apply_tensor_parallel`)."""
    from minigpt.model import CausalSelfAttention, Linear

    for module in model.modules():
        if isinstance(module, CausalSelfAttention) and type(module.qkv) is Linear:
            module.qkv = QKVColumns(module.qkv)


_SPLIT_KEY = re.compile(r"^(.*\.qkv)\.([qkv])\.(weight|bias)$")


def fuse_qkv(state: dict) -> dict:
    """A state dict (name -> tensor) of a model whose qkv was split by `split_fused_qkv`,
    with each q/k/v triple concatenated back under the single-device name
    ('blocks.0.attn.qkv.weight'). Other entries pass through. (Optimizer state:
    `fuse_qkv_optimizer`.)"""
    out, triples = _gather_triples(state)
    for key, triple in triples.items():
        out[key] = torch.cat([triple["q"], triple["k"], triple["v"]])
    return out


def _gather_triples(by_name: dict) -> tuple[dict, dict]:
    """({name: value} of the entries no split q/k/v owns, {fused name: {'q'|'k'|'v': value}})."""
    others, triples = {}, {}
    for name, value in by_name.items():
        match = _SPLIT_KEY.match(name)
        if match is None:
            others[name] = value
        else:
            triples.setdefault(f"{match.group(1)}.{match.group(3)}", {})[match.group(2)] = value
    return others, triples


def split_qkv(state: dict, names) -> dict:
    """The inverse of `fuse_qkv`, for a model whose state_dict has `names`: each
    '*.qkv.weight' / '*.qkv.bias' whose split names it has, as its q, k and v rows."""
    names = set(names)
    out = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if f"{prefix}.q.{leaf}" in names:
            for name, rows in zip("qkv", value.chunk(3)):
                out[f"{prefix}.{name}.{leaf}"] = rows
        else:
            out[key] = value
    return out


def fuse_qkv_optimizer(state: dict) -> dict:
    """An optimizer state keyed by parameter name (`get_optimizer_state_dict(...,
    full_state_dict=True)`) of a split model, under the single-device names: each q/k/v
    triple's per-parameter tensors concatenated by rows (a scalar such as AdamW's step is
    shared, so q's is kept), and the param groups' names fused. An empty dict (what ranks
    other than 0 get of a gathered state) stays empty."""
    if not state:
        return state
    per_param, triples = _gather_triples(state["state"])
    for name, triple in triples.items():
        per_param[name] = {key: torch.cat([triple[part][key] for part in "qkv"]) if torch.is_tensor(value)
                           and value.dim() > 0 else value for key, value in triple["q"].items()}
    groups = [{**group, "params": list(dict.fromkeys(
        f"{m.group(1)}.{m.group(3)}" if (m := _SPLIT_KEY.match(n)) else n for n in group["params"]))}
        for group in state["param_groups"]]
    return {"state": per_param, "param_groups": groups}


def split_qkv_optimizer(state: dict, names) -> dict:
    """The inverse of `fuse_qkv_optimizer`, for a model whose parameters are `names`."""
    names = set(names)

    def parts(name: str) -> list[str]:
        prefix, _, leaf = name.rpartition(".")
        return [f"{prefix}.{p}.{leaf}" for p in "qkv"] if f"{prefix}.q.{leaf}" in names else [name]

    per_param = {}
    for name, values in state["state"].items():
        split = parts(name)
        for i, part in enumerate(split):
            per_param[part] = values if len(split) == 1 else {
                key: value.chunk(3)[i] if torch.is_tensor(value) and value.dim() > 0 else value
                for key, value in values.items()}
    groups = [{**group, "params": [p for n in group["params"] for p in parts(n)]} for group in state["param_groups"]]
    return {"state": per_param, "param_groups": groups}


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Split `model` (a GPT whose qkv is already split) over `tp_mesh` with torch's
    `parallelize_module`, as the module docstring lays out; re-tie the head to the token
    embedding. Raises ValueError for what cannot be split (LoRA, a wrapped GPT)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    from minigpt.model import GPT, Linear

    if not isinstance(model, GPT):
        raise ValueError(f"tensor parallelism (train.tp > 1) splits a GPT; this run trains a {type(model).__name__} "
                         f"(a classifier or another wrapper); set train.tp=1")
    if any(not isinstance(m.attn.qkv, QKVColumns) or type(m.mlp.fc) is not Linear for m in model.blocks):
        raise ValueError("tensor parallelism (train.tp > 1) cannot split LoRA adapters; set train.tp=1")
    def gathered(extra_inputs: int = 0) -> PrepareModuleInput:
        """The first input, split along the sequence, gathered whole; the others (the KV cache,
        start, left padding: None, 0, None in training) passed as they are."""
        rest = (None,) * extra_inputs
        return PrepareModuleInput(input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest),
                                  use_local_output=True)

    for block in model.blocks:
        parallelize_module(block, tp_mesh, {
            "ln_1": SequenceParallel(),
            "attn": gathered(extra_inputs=3),
            "attn.qkv.q": ColwiseParallel(),
            "attn.qkv.k": ColwiseParallel(),
            "attn.qkv.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(output_layouts=Shard(1)),
            "ln_2": SequenceParallel(),
            "mlp": gathered(),
            "mlp.fc": ColwiseParallel(),
            "mlp.proj": RowwiseParallel(output_layouts=Shard(1)),
        })
    parallelize_module(model, tp_mesh, {
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "pos_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0)),
        "ln_f": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    })
    if model.config.tie_embeddings:  # both are Shard(0) of the same (V, C) matrix: one parameter again
        model.lm_head.weight = model.tok_emb.weight


def is_tensor_parallel(model: nn.Module) -> bool:
    """Whether `model`'s head was split by `apply_tensor_parallel` (its logits are then
    sharded along the vocabulary and the loss must run under `loss_parallel`)."""
    head = getattr(model, "lm_head", None)
    mesh = getattr(getattr(head, "weight", None), "device_mesh", None)  # a DTensor's (not importing DTensor:
    return mesh is not None and "tp" in (mesh.mesh_dim_names or ())      # 40 MB a single process never needs)


def loss_context(model: nn.Module) -> AbstractContextManager:
    """`loss_parallel()` for a tensor-parallel model (cross-entropy on vocabulary-sharded
    logits, forward and backward), else nothing."""
    if is_tensor_parallel(model):
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()
    return nullcontext()


def mixed_precision(device: torch.device, dtype: str) -> tuple[torch.dtype, torch.amp.GradScaler | None,
                                                                AbstractContextManager]:
    """(autocast dtype, a GradScaler when it is float16, the autocast context) for config.dtype.
    'auto' is bfloat16 on CUDA (float16 where bf16 is unsupported) and float32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda":
            resolved = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            resolved = torch.float32
    else:
        resolved = getattr(torch, dtype)
    scaler = torch.amp.GradScaler(device.type) if resolved == torch.float16 else None
    autocast = torch.autocast(device.type, dtype=resolved) if resolved != torch.float32 else nullcontext()
    return resolved, scaler, autocast


def _blocks(model: nn.Module) -> list[nn.Module]:
    from minigpt.model import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    """`block`'s forward, keeping only its inputs for backward and recomputing the rest
    there (Chen et al. 2016): activation memory of one block instead of every block.
    torch.utils.checkpoint restores the RNG state, so dropout masks, losses and gradients
    are the same as without it.

    Set as the block's own `forward` (and deleted on exit) rather than wrapping the block in
    torch's `checkpoint_wrapper`: the wrapper puts a level into every name under it
    (`blocks.0._checkpoint_wrapped_module.attn.qkv.weight`), which whatever reads the model by
    name while it trains would see (the optimizer's and the MFU observer's parameter names,
    `get_submodule("blocks.0.attn")`), and the caller would get back a model with other
    modules in it; the instance attribute changes the call and nothing else."""
    if not torch.is_grad_enabled():
        return type(block).forward(block, *args, **kwargs)
    return checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)


def _wrap(model: nn.Module, parallel: str, device: torch.device, device_mesh=None,
          compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The module to train: `model` itself, under DDP, or sharded in place by FSDP2 over
    `device_mesh`'s data-parallel dimensions (left unsharded when there is one such rank)."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from minigpt.model import Block

        replicate, shard = device_mesh["dp_replicate"].size(), device_mesh["dp_shard"].size()
        if replicate * shard == 1:  # tensor parallelism alone
            return model
        dp_mesh = device_mesh["dp_replicate", "dp_shard"] if replicate > 1 else device_mesh["dp_shard"]
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype if compute_dtype != torch.float32 else None,
                                      reduce_dtype=torch.float32)
        # Shard each transformer block, then the root (embeddings, final norm, head).
        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module, mesh=dp_mesh, mp_policy=policy)
        fully_shard(model, mesh=dp_mesh, mp_policy=policy)
        return model
    return model
