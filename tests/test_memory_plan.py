"""The memory plan (`minigpt.memory_plan`): shard counts against a real model's tensors,
the single-process plan against a tracked peak, the mesh's validation and the CLI."""
import json
import math

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.cli import main
from minigpt.train.mesh import MeshShape
from minigpt.memory_plan import GIB, check_mesh, memory_plan, parse_mesh, smallest_mesh

TINY = dict(vocab_size=96, block_size=16, n_layer=2, n_head=4, n_embd=32)

# Tensor parallelism by parameter name (the Megatron-LM layout the plan models), written
# here independently of the plan: the dimension each kind of tensor is split along.
COLUMN_PARALLEL = ("attn.qkv.weight", "attn.qkv.bias", "mlp.fc.weight", "mlp.fc.bias")  # dim 0
ROW_PARALLEL = ("attn.proj.weight", "mlp.proj.weight")  # dim 1
VOCAB_PARALLEL = ("tok_emb.weight", "lm_head.weight", "pos_emb.weight")  # dim 0 (rows)


def _local_numel(name: str, p: torch.Tensor, mesh: MeshShape) -> int:
    """Elements of rank 0's piece of `p`: its tp shard (torch.chunk, as DTensor's Shard), then
    FSDP2's dim-0 chunk of that shard (torch.chunk's first chunk, the rounded-up one)."""
    shard = p
    if name.endswith(COLUMN_PARALLEL) or name.endswith(VOCAB_PARALLEL):
        shard = torch.chunk(shard, mesh.tp, dim=0)[0]
    elif name.endswith(ROW_PARALLEL):
        shard = torch.chunk(shard, mesh.tp, dim=1)[0]
    return torch.chunk(shard, mesh.dp_shard, dim=0)[0].numel()


@pytest.mark.parametrize("overrides", [{}, {"bias": False, "qkv_bias": False}, {"tie_embeddings": False, "n_inner": 48}])
@pytest.mark.parametrize("mesh", [MeshShape(), MeshShape(dp_shard=2), MeshShape(dp_replicate=2, dp_shard=3), MeshShape(tp=2),
                                  MeshShape(dp_shard=5, tp=4), MeshShape(dp_replicate=3, dp_shard=7, tp=2)])
def test_plan_counts_every_local_parameter_gradient_and_moment_of_a_real_model(mesh, overrides):
    config = GPTConfig(**{**TINY, **overrides})
    model = GPT(config)
    local = sum(_local_numel(name, p, mesh) for name, p in model.named_parameters())
    plan = memory_plan(config, mesh, batch_size=2, seq_len=16, dtype="bf16")
    assert plan.params == 4 * local  # float32 master weights, also under autocast
    assert plan.gradients == 4 * local
    assert plan.optimizer == 8 * local
    assert (plan.gathered == 0) == (mesh.dp_shard == 1)


def test_single_rank_state_matches_adamw_after_a_real_step():
    config = GPTConfig(**TINY)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    model(idx, idx).loss.backward()
    optimizer.step()
    plan = memory_plan(config, MeshShape(), batch_size=2, seq_len=16, dtype="fp32")
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    assert plan.params == nbytes(model.parameters())
    assert plan.gradients == nbytes(p.grad for p in model.parameters())
    moments = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert plan.optimizer == nbytes(moments)


def _tracked_peak(config: GPTConfig, batch: int, seq: int, checkpointing: bool, dtype: str) -> int:
    """Peak live tensor bytes of a training step (after one that allocates AdamW's moments)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from minigpt.train.config import TrainConfig
    from minigpt.train.parallel import parallelize

    torch.manual_seed(0)
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (batch, seq))
    train = TrainConfig(out_dir="unused", max_steps=2, batch_size=batch, activation_checkpointing=checkpointing)
    with parallelize(model, train, "none", torch.device("cpu")) as module:
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, fused=True)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = module(idx, idx).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        tracker = MemTracker()
        tracker.track_external(module, optimizer)
        with tracker:
            step()
    snapshot = tracker.get_tracker_snapshot("peak")
    return int(next(iter(snapshot.values()))["Total"])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_single_process_plan_is_within_15_percent_of_the_tracked_peak(checkpointing, dtype):
    config = GPTConfig(vocab_size=512, block_size=64, n_layer=3, n_head=4, n_embd=64)
    peak = _tracked_peak(config, batch=4, seq=64, checkpointing=checkpointing, dtype=dtype)
    plan = memory_plan(config, MeshShape(), batch_size=4, seq_len=64, dtype=dtype, activation_checkpointing=checkpointing)
    assert 0.85 <= plan.total / peak <= 1.15, (plan.total, peak)


def test_checkpointing_keeps_one_input_per_block_instead_of_every_activation():
    config = GPTConfig.from_preset("gpt3-xl")
    full = memory_plan(config, MeshShape(dp_shard=8), 1, 2048, "fp32")
    ckpt = memory_plan(config, MeshShape(dp_shard=8), 1, 2048, "fp32", activation_checkpointing=True)
    assert ckpt.activation_parts["block inputs"] == config.n_layer * 2048 * config.n_embd * 4
    assert ckpt.activations < full.activations / 4
    assert ckpt.recompute == full.activation_parts["blocks"] // config.n_layer
    assert ckpt.params == full.params and ckpt.gathered == full.gathered


@pytest.mark.parametrize("tp", [1, 2])
def test_bf16_autocast_with_checkpointing_counts_the_cached_weight_casts_of_every_block(tp):
    # torch.autocast caches the bf16 cast of each parameter until the forward ends (measured
    # in benchmarks/results/memory_plan_cpu.md): all blocks' linear weights and biases, tp-sharded.
    config = GPTConfig(**{**TINY, "vocab_size": 128})
    model = GPT(config)
    linear = sum(_local_numel(n, p, MeshShape(tp=tp)) for n, p in model.named_parameters()
                 if n.startswith("blocks.") and (".attn." in n or ".mlp." in n))
    plan = memory_plan(config, MeshShape(tp=tp), 1, 16, "bf16", activation_checkpointing=True)
    assert plan.activation_parts["autocast weight copies"] == 2 * linear
    for mesh, kwargs in ((MeshShape(tp=tp), {"dtype": "fp32"}), (MeshShape(tp=tp), {"autocast_cache": False}),
                         # FSDP2 gathers in bf16 itself (MixedPrecisionPolicy): no copies stay
                         (MeshShape(dp_shard=4, tp=tp), {})):
        other = memory_plan(config, mesh, 1, 16, activation_checkpointing=True, **kwargs)
        assert "autocast weight copies" not in other.activation_parts


def test_tensor_parallelism_divides_the_activations_but_the_gathered_norm_outputs_and_the_loss_keeps_a_fourth():
    # Measured under torch's tensor parallelism (benchmarks/results/memory_plan_cpu.md): the
    # column-parallel matmuls save the LayerNorm outputs as gathered, whole (4 bytes x C per
    # token for ln_1 and ln_2 in each block, and ln_f's for the head), and `loss_parallel`
    # holds four float32 (B, T, V / tp) tensors at its peak where one process holds three.
    config = GPTConfig(**{**TINY, "vocab_size": 128})
    C, V, tokens = config.n_embd, config.vocab_size, 4 * 16
    one = memory_plan(config, MeshShape(), 4, 16, "fp32")
    four = memory_plan(config, MeshShape(tp=4), 4, 16, "fp32")
    whole_norms = tokens * 4 * 2 * C * config.n_layer
    assert four.activation_parts["blocks"] == pytest.approx((one.activation_parts["blocks"] - whole_norms) / 4
                                                            + whole_norms, abs=4)
    loss_one, loss_four = 12 * tokens * V, 16 * tokens * V // 4
    head_norm = tokens * 4 * C
    assert four.activation_parts["head and loss"] == pytest.approx(
        (one.activation_parts["head and loss"] - loss_one - head_norm) / 4 + head_norm + loss_four, abs=4)


@pytest.mark.parametrize("text, mesh", [
    ("dp_shard=8", MeshShape(dp_shard=8)),
    ("dp_shard=4,tp=2", MeshShape(dp_shard=4, tp=2)),
    (" tp = 2 , dp_replicate=3 ", MeshShape(dp_replicate=3, tp=2)),
])
def test_parse_mesh_reads_degrees_and_a_missing_one_is_1(text, mesh):
    assert parse_mesh(text) == mesh
    assert parse_mesh(str(mesh)) == mesh


@pytest.mark.parametrize("text, message", [
    ("pp=2", r"mesh key 'pp' is unknown; write --mesh as .*\(keys: dp_replicate, dp_shard, tp\)"),
    ("dp=2", "mesh key 'dp' is unknown"),
    ("dp_shard=0", r"mesh dp_shard=0 must be a positive integer \(1 means that dimension is not used\)"),
    ("tp=-2", "mesh tp=-2 must be a positive integer"),
    ("tp=two", "mesh tp='two' must be a positive integer; e.g. tp=2"),
    ("tp=2.5", "mesh tp='2.5' must be a positive integer"),
    ("tp=2,tp=4", "mesh key 'tp' is given twice"),
    ("dp_shard", "mesh part 'dp_shard' is not key=value"),
    ("", "mesh part '' is not key=value"),
])
def test_parse_mesh_refuses_what_it_cannot_read_and_names_the_form(text, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh(text)


@pytest.mark.parametrize("overrides, mesh, seq, message", [
    ({}, MeshShape(tp=3), 16, r"tp=3 must divide model.n_head=4: .* choose tp from \[1, 2, 4\]"),
    ({"n_inner": 36}, MeshShape(tp=8), 16, None),  # n_head=4 first
    ({"n_head": 8, "n_inner": 36}, MeshShape(tp=8), 16, r"tp=8 must divide the MLP width 36 .* choose tp from \[1, 2, 4\]"),
    ({"vocab_size": 128, "block_size": 20}, MeshShape(tp=4), 18, r"seq_len=18 must be a multiple of mesh tp=4 .* use seq_len=20"),
])
def test_check_mesh_refuses_a_tp_that_does_not_divide_what_it_splits(overrides, mesh, seq, message):
    config = GPTConfig(**{**TINY, "vocab_size": 128, **overrides})
    with pytest.raises(ValueError, match=message or "tp=8 must divide model.n_head=4"):
        check_mesh(config, mesh, seq)
    with pytest.raises(ValueError):
        memory_plan(config, mesh, 1, seq)


def test_plan_refuses_bad_sizes_and_dtypes():
    config = GPTConfig(**TINY)
    with pytest.raises(ValueError, match="batch_size=0 must be a positive integer"):
        memory_plan(config, MeshShape(), 0)
    with pytest.raises(ValueError, match=r"seq_len=17 must be an integer in \[1, block_size=16\]"):
        memory_plan(config, MeshShape(), 1, 17)
    with pytest.raises(ValueError, match=r"dtype='fp16' is not supported; choose one of \('fp32', 'bf16'\)"):
        memory_plan(config, MeshShape(), 1, dtype="fp16")
    with pytest.raises(ValueError, match="mesh tp=0 must be a positive integer"):
        MeshShape(tp=0)


def test_smallest_mesh_fits_and_one_rank_fewer_does_not():
    config = GPTConfig(**{**TINY, "vocab_size": 128})
    budget = 0.9 * memory_plan(config, MeshShape(), 1, 16, activation_checkpointing=True).total / GIB
    plan = smallest_mesh(config, budget, 1, 16)
    assert plan is not None and plan.fits(budget) and plan.mesh.world_size > 1
    fewer = plan.mesh.world_size - 1
    for tp in (t for t in range(1, fewer + 1) if fewer % t == 0 and 4 % t == 0):
        assert not memory_plan(config, MeshShape(dp_shard=fewer // tp, tp=tp), 1, 16, activation_checkpointing=True).fits(budget)


def test_cli_inspect_mesh_prints_the_plan_and_its_json(capsys):
    main(["inspect", "gpt3-175b", "--mesh", "dp_shard=64", "--batch", "1", "--seq", "2048", "--gpu-memory", "80"])
    text = capsys.readouterr().out
    for words in ("gpt3-175b: memory per rank, mesh dp_replicate=1,dp_shard=64,tp=1 (world size 64)",
                  "batch 1 per data-parallel rank x T=2048", "bf16 autocast", "no checkpointing", "checkpointing",
                  "AdamW state", "fits 80 GiB"):
        assert words in text
    main(["inspect", "gpt3-175b", "--mesh", "dp_shard=64", "--batch-size", "1", "--seq-len", "2048", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["gpu_memory_gib"] == 80.0 and [p["activation_checkpointing"] for p in data["plans"]] == [False, True]
    config = GPTConfig.from_preset("gpt3-175b")
    ckpt = data["plans"][1]
    assert ckpt["mesh"] == {"dp_replicate": 1, "dp_shard": 64, "tp": 1, "world_size": 64}
    assert ckpt["params"] == pytest.approx(4 * config.num_params() / 64, rel=1e-3)
    assert ckpt["total"] == ckpt["params"] + ckpt["optimizer"] + ckpt["gathered"] + max(
        ckpt["activations"], ckpt["gradients"] + ckpt["recompute"] + ckpt["gathered_gradients"])
    assert ckpt["fits"] == (ckpt["total"] <= 80 * GIB)


def test_cli_inspect_without_mesh_is_the_report_and_plan_flags_need_a_mesh(capsys):
    main(["inspect", "gpt3-small", "--batch", "2", "--seq", "128"])
    assert "KV cache, batch 2 x 128" in capsys.readouterr().out
    cases = [
        (["inspect", "gpt3-small", "--gpu-memory", "40"], "--gpu-memory only apply to the memory plan"),
        (["inspect", "gpt3-small", "--dtype", "fp32"], "add --mesh (e.g. --mesh dp_shard=1 for one GPU)"),
        (["inspect", "gpt3-small", "--mesh", "pp=2"], "mesh key 'pp' is unknown"),
        (["inspect", "gpt3-small", "--mesh", "tp=5"], "tp=5 must divide model.n_head=12"),
        (["inspect", "gpt3-small", "--mesh", "tp=2", "--seq", "101"], "seq_len=101 must be a multiple of mesh tp=2"),
        (["inspect", "gpt3", "--mesh", "tp=1"], "name a preset, e.g. gpt3-175b"),
        (["inspect", "gpt3-small", "--mesh", "tp=1", "--gpu-memory", "0"], "gpu_memory_gib=0.0 must be a positive"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code.startswith("minigpt inspect: error: ") and message in info.value.code, info.value.code


def test_gpt3_175b_fits_80_gib_gpus_once_fsdp_gathers_in_bf16_and_not_in_one():
    # One GPU: 16 bytes per parameter of weights, gradients and AdamW state alone. Sharded,
    # FSDP2 gathers in bf16 (MixedPrecisionPolicy), so no rank keeps bf16 copies of every
    # block; the smallest mesh is the smallest world whose shards, activations and gathered
    # blocks fit, and one fewer data-parallel rank does not.
    config = GPTConfig.from_preset("gpt3-175b")
    assert not memory_plan(config, MeshShape(), 1, 2048, activation_checkpointing=True).fits(80)
    plan = smallest_mesh(config, 80, 1, 2048, max_world_size=256)
    assert plan is not None and plan.fits(80) and "autocast weight copies" not in plan.activation_parts
    assert plan.mesh.world_size * 80 * GIB >= 16 * config.num_params()  # AdamW state alone needs this much
    shards = plan.mesh.dp_shard * plan.mesh.tp
    assert math.isclose(plan.params * shards, 4 * config.num_params(), rel_tol=0.02)
    fewer = MeshShape(dp_shard=plan.mesh.dp_shard - 1, tp=plan.mesh.tp)
    assert not memory_plan(config, fewer, 1, 2048, activation_checkpointing=True).fits(80)
