"""The device mesh's rules, in one process: degrees that cannot make the job are refused
with the fix, the split q/k/v projection computes what the fused one does, state dicts
keep the single-device names, and what a sharded checkpoint cannot do is said."""
from __future__ import annotations

import pytest
import torch

from minigpt import GPT
from minigpt.train.materialize import init_by_name
from minigpt.train.mesh import MeshShape
from minigpt.train.parallel import QKVColumns, fuse_qkv, split_fused_qkv, split_qkv
from tests.train.common import quick_train_config, tiny_gpt_config


def test_dp_shard_takes_the_ranks_the_other_degrees_leave():
    assert MeshShape.resolve(8, dp_replicate=2, tp=2) == MeshShape(2, 2, 2)
    assert MeshShape.resolve(4) == MeshShape(1, 4, 1)
    mesh = MeshShape(dp_replicate=1, dp_shard=2, tp=2)
    assert [mesh.dp_rank(r) for r in range(4)] == [0, 0, 1, 1] and [mesh.tp_rank(r) for r in range(4)] == [0, 1, 0, 1]


@pytest.mark.parametrize("world, degrees, message", [
    (4, dict(dp_shard=2, tp=4), r"dp_replicate=1 x dp_shard=2 x tp=4 = 8 ranks, but the job has 4"),
    (6, dict(tp=4), r"tp=4 = 4 does not divide the world size 6; .*train.tp=3"),
    (4, dict(tp=0), r"train.tp=0 must be at least 1"),
    (4, dict(dp_shard=0), r"train.dp_shard=0 must be at least 1, or -1"),
])
def test_degrees_that_do_not_make_the_job_are_refused_with_the_fix(world, degrees, message):
    with pytest.raises(ValueError, match=message):
        MeshShape.resolve(world, **degrees)


def test_tp_must_split_the_heads_and_the_mlp_evenly():
    with pytest.raises(ValueError, match=r"train.tp=3 must divide model.n_head=4: .*\[1, 2, 4\]"):
        MeshShape(tp=3).check_model(n_head=4, mlp_width=12)
    with pytest.raises(ValueError, match=r"must divide the MLP width 10"):
        MeshShape(tp=4).check_model(n_head=4, mlp_width=10)


@pytest.mark.parametrize("fields, message", [
    (dict(parallel="ddp", tp=2), r"'ddp' cannot use a mesh .*use parallel='fsdp'"),
    (dict(optimizer="muon", tp=2), r"optimizer='muon' cannot be used with tp > 1"),
    (dict(dp_shard=-2), r"dp_shard=-2 must be a positive integer, or -1"),
    (dict(checkpoint_format="zip"), r"checkpoint_format='zip' must be one of"),
    (dict(tp=2, compile=True, activation_checkpointing=True), r"compile=True with tp > 1 and activation_checkp"),
])
def test_train_config_refuses_what_a_mesh_cannot_do(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        quick_train_config(tmp_path, **fields)


def test_sharded_checkpoints_outside_the_mesh_path_are_refused_before_training(tmp_path):
    from minigpt.train import train

    config = quick_train_config(tmp_path / "run", checkpoint_format="sharded")
    with pytest.raises(ValueError, match=r"checkpoint_format='sharded' is written on the mesh path.*'none'"):
        train(GPT(tiny_gpt_config()), config, None)
    assert not (tmp_path / "run").exists()


def test_split_qkv_computes_the_fused_projection_and_keeps_single_device_names():
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config(qkv_bias=True))
    fused_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, 32)
    fused_out = model.blocks[0].attn.qkv(x)
    idx = torch.randint(0, 65, (2, 16))
    logits = model(idx).logits
    split_fused_qkv(model)
    assert isinstance(model.blocks[0].attn.qkv, QKVColumns)
    torch.testing.assert_close(model.blocks[0].attn.qkv(x), fused_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(idx).logits, logits, rtol=1e-5, atol=1e-6)
    split_state = model.state_dict()
    assert "blocks.0.attn.qkv.q.weight" in split_state and "blocks.0.attn.qkv.weight" not in split_state
    fused_again = fuse_qkv(split_state)
    assert fused_again.keys() == fused_state.keys()
    for name in fused_state:
        torch.testing.assert_close(fused_again[name], fused_state[name], rtol=0, atol=0, msg=name)
    assert split_qkv(fused_state, split_state.keys()).keys() == split_state.keys()


def test_init_by_name_draws_the_same_weights_split_or_fused_with_gpt2s_spread():
    fused, split = GPT(tiny_gpt_config(n_layer=4)), GPT(tiny_gpt_config(n_layer=4))
    split_fused_qkv(split)
    init_by_name(fused, seed=3)
    init_by_name(split, seed=3)
    for name, value in fuse_qkv(split.state_dict()).items():
        torch.testing.assert_close(value, fused.state_dict()[name], rtol=0, atol=0, msg=name)
    state = fused.state_dict()
    assert state["lm_head.weight"] is not None and fused.lm_head.weight is fused.tok_emb.weight
    assert state["tok_emb.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert state["blocks.0.attn.proj.weight"].std().item() == pytest.approx(0.02 / 8 ** 0.5, rel=0.1)
    assert torch.equal(state["blocks.0.ln_1.weight"], torch.ones(32)) and not state["blocks.1.mlp.fc.bias"].any()
    other = GPT(tiny_gpt_config(n_layer=4))
    init_by_name(other, seed=4)
    assert not torch.equal(other.state_dict()["tok_emb.weight"], state["tok_emb.weight"])


def test_export_refuses_a_folder_that_is_no_run_and_an_out_that_holds_files(tmp_path):
    from minigpt.train.export import export_checkpoint

    with pytest.raises(ValueError, match=r"neither a checkpoint folder .* nor a run folder"):
        export_checkpoint(tmp_path, tmp_path / "out")
    run = tmp_path / "run"
    from minigpt.train import train

    class Batches:
        def next_batch(self):
            idx = torch.randint(0, 65, (2, 16))
            return {"idx": idx, "targets": idx}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    train(GPT(tiny_gpt_config()), quick_train_config(run, max_steps=1), Batches())
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*taken already exists and is not an empty folder"):
        export_checkpoint(run, taken)
    assert export_checkpoint(run, tmp_path / "model") == "minigpt"  # banded layers with GPT-2's scaling
    torch.testing.assert_close(GPT.from_pretrained(tmp_path / "model").state_dict()["tok_emb.weight"],
                               GPT.from_pretrained(run / "checkpoints" / "latest").state_dict()["tok_emb.weight"])


def test_a_model_materialized_in_one_process_keeps_its_tied_head():
    from minigpt.train.materialize import materialize

    with torch.device("meta"):
        model = GPT(tiny_gpt_config())
    materialize(model, torch.device("cpu"), seed=0)
    assert model.lm_head.weight is model.tok_emb.weight
    reference = GPT(tiny_gpt_config())
    init_by_name(reference, seed=0)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_finetuning_refuses_the_mesh_up_front_naming_the_degrees(tmp_path):
    from minigpt.finetune.config import FinetuneConfig
    from minigpt.finetune.run import finetune

    config = FinetuneConfig(task="completion", train_file=str(tmp_path / "never-read.csv"))
    with pytest.raises(ValueError, match=r"fine-tuning runs in one process or under DDP.*tp=2"):
        finetune(config, quick_train_config(tmp_path / "run", tp=2))
    assert not (tmp_path / "run").exists()
