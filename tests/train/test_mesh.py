"""The device mesh end to end: real torchrun jobs of 2 and 4 CPU processes (gloo), each
layout giving the per-step losses of one process on the same global batch, a sharded
checkpoint resumed on other meshes, and its export loaded by `transformers`.

fp32 throughout. The layouts sum in other orders than one process (the tensor-parallel
row projections add partial products across ranks, FSDP averages gradients across ranks),
so losses agree to fp32 rounding carried through ten AdamW updates: rtol 1e-5, atol 1e-5.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt import GPT
from scripts.checkout import child_env
from tests.train.common import train_as_pretrain_from_init_by_name

# GPT-Neo's shape (dense and banded layers, no attention scaling, no q/k/v bias), so that
# `transformers` can load the export; 4 heads split over tp=2; 65 symbols split unevenly.
MODEL = {"vocab_size": 65, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32, "dropout": 0.0,
         "attention_pattern": ["dense", "banded"], "attention_window": 8, "attention_scale": 1.0,
         "qkv_bias": False}
GLOBAL_BATCH = 8
LOSS_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _config(data: Path, out_dir: Path, dp: int, max_steps: int = 10, sample_tokens: int = 0, **train) -> dict:
    return {
        "model": MODEL,
        "train": {"out_dir": str(out_dir), "max_steps": max_steps, "batch_size": GLOBAL_BATCH // dp, "grad_accum": 1, "optimizer": "adamw", "lr": 3e-3, "lr_decay_steps": 10,
                  "warmup_steps": 1, "eval_interval": 5, "eval_steps": 1, "log_interval": 1,
                  "checkpoint_interval": 5, "device": "cpu", "progress": False, **train},
        "data": {"path": str(data)},
        "sample": {"tokens": sample_tokens, "seed": 0},
    }


def _torchrun(tmp_path: Path, name: str, nproc: int, config: dict, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "minigpt", "train", "--config", str(path), *extra]
    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]  # torchrun: every rank exited 0
    return done


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, shakespeare_chars) -> Path:
    """The reference: one process, the global batch of 8, ten updates, from the weights every
    mesh starts from (each rank fills its shards by `init_by_name`)."""
    out = tmp_path_factory.mktemp("mesh") / "single"
    path = out.parent / "single.json"
    path.write_text(json.dumps(_config(shakespeare_chars, out, dp=1)))
    train_as_pretrain_from_init_by_name(path)
    return out


@pytest.mark.parametrize("nproc, mesh", [
    (4, {"dp_shard": 2, "tp": 2}),
    (2, {"tp": 2}),
    (2, {"dp_shard": 2, "checkpoint_format": "sharded"}),
    (4, {"dp_replicate": 2, "dp_shard": 2}),
    (4, {"dp_shard": 2, "tp": 2, "activation_checkpointing": True}),
    (2, {"tp": 2, "checkpoint_format": "full"}),
], ids=["2x2", "tp2", "dp_shard2", "hsdp2x2", "2x2-checkpointing", "tp2-full"])
def test_each_mesh_gives_the_losses_of_one_process(tmp_path, shakespeare_chars, single, nproc, mesh):
    tp = mesh.get("tp", 1)
    dp = nproc // tp
    done = _torchrun(tmp_path, "run", nproc, _config(shakespeare_chars, tmp_path / "run", dp=dp, **mesh))
    shape = f"dp_replicate={mesh.get('dp_replicate', 1)},dp_shard={dp // mesh.get('dp_replicate', 1)},tp={tp}"
    assert f"mesh {shape}), global batch {dp} x {GLOBAL_BATCH // dp} sequences" in done.stderr
    losses = _losses(tmp_path / "run")
    assert len(losses) == 10
    torch.testing.assert_close(losses, _losses(single), **LOSS_TOLERANCE)
    latest = (tmp_path / "run" / "checkpoints" / "latest").resolve()
    sharded = mesh.get("checkpoint_format", "sharded" if tp > 1 else "full") == "sharded"
    if sharded:
        assert (latest / "sharded" / ".metadata").is_file() and not (latest / "model.safetensors").exists()
        # every rank wrote its own shards; none gathered the model
        assert len(list((latest / "sharded").glob("*.distcp"))) == nproc
    else:  # gathered on rank 0, under the single-device names: a model folder. Ten AdamW updates
        # apart in summation order: Adam divides by each entry's RMS gradient, so an entry whose
        # gradient is near zero moves by rounding noise times lr (3e-3); hence atol 5e-5.
        reference = GPT.from_pretrained(single / "checkpoints" / "latest").state_dict()
        for name, value in GPT.from_pretrained(latest).state_dict().items():
            torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=5e-5, msg=lambda m: f"{name}: {m}")


def test_a_sharded_checkpoint_resumes_on_other_meshes_with_the_uninterrupted_losses(
        tmp_path, shakespeare_chars, single):
    """Saved on 2x2 after 5 updates; resumed on 4x1 (FSDP alone) and 1x2 (tp alone) for 5
    more, each equal to the uninterrupted one-process run's updates 6-10."""
    first = tmp_path / "first"
    _torchrun(tmp_path, "first", 4, _config(shakespeare_chars, first, dp=2, max_steps=5, dp_shard=2, tp=2))
    assert (first / "checkpoints" / "step_0000005" / "sharded" / ".metadata").is_file()
    expected = _losses(single)[5:]
    for name, nproc, mesh in (("4x1", 4, {"dp_shard": 4}), ("1x2", 2, {"tp": 2})):
        run = tmp_path / name
        shutil.copytree(first, run)
        dp = nproc // mesh.get("tp", 1)
        done = _torchrun(tmp_path, name, nproc, _config(shakespeare_chars, run, dp=dp, **mesh), "--resume")
        assert "resumed from" in done.stderr and "(step 5)" in done.stderr
        torch.testing.assert_close(_losses(run)[5:], expected, **LOSS_TOLERANCE,
                                   msg=lambda m: f"resumed on {name}: {m}")


def test_a_gathered_mesh_checkpoint_resumes_in_one_process_and_under_ddp_and_not_the_reverse(
        tmp_path, shakespeare_chars, single):
    """A dp_shard=2 run with gathered (full) checkpoints keeps the optimizer state under the
    single-device names, so one process and DDP resume it with the uninterrupted losses; a
    one-process checkpoint (optimizer state by position) is refused on the mesh, with the reason."""
    from minigpt.pretrain.config import load_config
    from minigpt.pretrain.run import pretrain

    first = tmp_path / "first"
    _torchrun(tmp_path, "first", 2, _config(shakespeare_chars, first, dp=2, max_steps=5, dp_shard=2,
                                             checkpoint_format="full"))
    expected = _losses(single)[5:]
    ddp = tmp_path / "ddp"
    shutil.copytree(first, ddp)
    done = _torchrun(tmp_path, "ddp", 2, _config(shakespeare_chars, ddp, dp=2, parallel="ddp"), "--resume")
    assert "(step 5)" in done.stderr
    torch.testing.assert_close(_losses(ddp)[5:], expected, **LOSS_TOLERANCE)
    one = tmp_path / "one"
    shutil.copytree(first, one)
    path = tmp_path / "one.json"
    path.write_text(json.dumps(_config(shakespeare_chars, one, dp=1)))
    pretrain(load_config(file=path), resume=True)
    torch.testing.assert_close(_losses(one)[5:], expected, **LOSS_TOLERANCE)
    # ... and the reverse: ddp's last checkpoint (by position) on the mesh is refused
    path = tmp_path / "back.json"
    path.write_text(json.dumps(_config(shakespeare_chars, ddp, dp=2, max_steps=12, dp_shard=2)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "minigpt", "train", "--config", str(path), "--resume"]
    refused = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "optimizer state is by position" in refused.stderr


def test_export_of_a_sharded_checkpoint_loads_in_transformers_with_the_models_logits(
        tmp_path, shakespeare_chars, single):
    """The 2x2 run's last (sharded) checkpoint, exported, is a GPT-Neo folder: `transformers`
    gives the logits of minigpt's single-process model after the same updates (fp32, 1e-4:
    ten updates apart in summation order), and the end-of-run sample read the shards."""
    from transformers import GPTNeoForCausalLM

    from minigpt.cli import main

    run = tmp_path / "run"
    done = _torchrun(tmp_path, "run", 4, _config(shakespeare_chars, run, dp=2, sample_tokens=20, dp_shard=2, tp=2))
    assert "--- sample from" in done.stdout and len(done.stdout.split("---\n")[1]) > 20
    out = tmp_path / "exported"
    main(["export", str(run), "--out", str(out)])
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt_neo"
    assert (out / "tokenizer.json").is_file() or any(out.glob("*.json"))
    hf = GPTNeoForCausalLM.from_pretrained(out).eval()
    reference = GPT.from_pretrained(single / "checkpoints" / "latest").eval()
    idx = torch.randint(0, 65, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, reference(idx).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(GPT.from_pretrained(out)(idx).logits, hf(idx).logits, rtol=1e-5, atol=1e-5)


START_WORKER = """
import json, sys, torch
from pathlib import Path
from torch.distributed._tools.mem_tracker import MemTracker
from minigpt import GPT
from minigpt.config import GPTConfig
from minigpt.train import distributed as dist_
from minigpt.train.config import TrainConfig
from minigpt.train.materialize import materialize
from minigpt.train.mesh import MeshShape
from minigpt.train.parallel import parallelize

config = GPTConfig(vocab_size=1024, block_size=64, n_layer=4, n_head=4, n_embd=256, dropout=0.0)
with dist_.process_group("cpu") as info:
    mesh = MeshShape.resolve(info.world_size, 1, -1, 2)
    train = TrainConfig(out_dir=sys.argv[1], max_steps=1, batch_size=1, tp=2, device="cpu")
    tracker = MemTracker()
    with tracker:
        with torch.device("meta"):
            model = GPT(config)
        with parallelize(model, train, "fsdp", torch.device("cpu"), mesh):
            materialize(model, torch.device("cpu"), seed=0)
            shard = sum(p.to_local().numel() * 4 for p in model.parameters())
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    # a file per rank: lines printed by several processes at once can interleave
    (Path(sys.argv[1]) / f"rank{info.rank}.json").write_text(json.dumps({"shard": shard, "peak": peak}))
"""


def test_a_rank_starts_with_its_shard_never_the_whole_model(tmp_path):
    """On a 2x2 mesh, building, distributing and filling the model costs each rank its shard
    (a quarter) plus transients of about the largest single parameter, as torch's allocation
    tracker (`MemTracker`) counts the CPU bytes: well under the whole model's size."""
    from minigpt.config import GPTConfig

    config = GPTConfig(vocab_size=1024, block_size=64, n_layer=4, n_head=4, n_embd=256, dropout=0.0)
    whole_model = GPT(config)
    whole = sum(p.numel() * 4 for p in whole_model.parameters())
    largest = max(p.numel() * 4 for p in whole_model.parameters())
    script = tmp_path / "start.py"
    script.write_text(START_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", str(script),
           str(tmp_path)]
    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for rank in ranks:
        assert rank["shard"] == pytest.approx(whole / 4, rel=0.02)
        assert rank["peak"] < 0.5 * whole, rank
        assert rank["peak"] <= rank["shard"] + 3 * largest, rank


KILL_WORKER = """
import os, signal, sys
import torch.distributed.checkpoint as dcp
from minigpt.cli import main

save = dcp.save
def save_or_die(state, checkpoint_id, **kwargs):
    if "step_0000010" in str(checkpoint_id) and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)  # rank 1 dies as the sharded save of step 10 begins
    return save(state, checkpoint_id=checkpoint_id, **kwargs)
dcp.save = save_or_die
main(["train", "--config", sys.argv[1], *sys.argv[2:]])
"""


def test_a_rank_killed_during_a_sharded_save_leaves_the_previous_checkpoint_to_resume(
        tmp_path, shakespeare_chars, single):
    run = tmp_path / "run"
    config = tmp_path / "run.json"
    config.write_text(json.dumps(_config(shakespeare_chars, run, dp=1, tp=2)))
    script = tmp_path / "kill.py"
    script.write_text(KILL_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(config)]
    killed = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and "Signal 9" in killed.stderr + killed.stdout
    checkpoints = run / "checkpoints"
    assert [p.name for p in checkpoints.glob("step_*")] == ["step_0000005"]  # step 10 never appeared
    assert (checkpoints / "latest").resolve().name == "step_0000005"
    done = _torchrun(tmp_path, "resume", 2, json.loads(config.read_text()), "--resume")
    assert "(step 5)" in done.stderr and not list(checkpoints.glob(".tmp-*"))  # the leftover is cleared
    losses = _losses(run)
    torch.testing.assert_close(losses[-5:], _losses(single)[5:], **LOSS_TOLERANCE)


def test_a_cut_short_shard_makes_the_resume_fall_back_to_the_previous_checkpoint(tmp_path, shakespeare_chars, single):
    run = tmp_path / "run"
    config = _config(shakespeare_chars, run, dp=2, dp_shard=2, checkpoint_format="sharded")
    _torchrun(tmp_path, "run", 2, config)
    shard = sorted((run / "checkpoints" / "step_0000010" / "sharded").glob("*.distcp"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    (run / "metrics.jsonl").write_text("".join(line for line in (run / "metrics.jsonl").read_text().splitlines(True)
                                               if json.loads(line)["step"] <= 5))
    done = _torchrun(tmp_path, "resume", 2, config, "--resume")
    assert f"{shard.name} holds 100 bytes of the" in done.stderr and "(step 5)" in done.stderr
    torch.testing.assert_close(_losses(run)[5:], _losses(single)[5:], **LOSS_TOLERANCE)


def test_a_two_node_launch_on_localhost_trains(tmp_path, shakespeare_chars, single):
    """torchrun --nnodes=2, one process per 'node', a c10d rendezvous on 127.0.0.1: FSDP2
    across the two nodes gives the one-process losses."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "nodes.json"
    config.write_text(json.dumps(_config(shakespeare_chars, tmp_path / "run", dp=2, max_steps=3, dp_shard=2)))
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=minigpt-test",
         "-m", "minigpt", "train", "--config", str(config)],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    torch.testing.assert_close(_losses(tmp_path / "run"), _losses(single)[:3], **LOSS_TOLERANCE)


TP_WORKER = """
import json, sys, torch
from minigpt import GPT
from minigpt.config import GPTConfig
from minigpt.train import distributed as dist_
from minigpt.train.config import TrainConfig
from minigpt.train.mesh import MeshShape
from minigpt.train.parallel import fuse_qkv, loss_context, parallelize

backend, compile_ = sys.argv[1], sys.argv[2] == "compile"
config = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                   attention_pattern=["dense", "banded"], attention_window=8)
with dist_.process_group("cpu") as info:
    torch.manual_seed(0)
    model, reference = GPT(config, backend=backend), GPT(config, backend="math")
    reference.load_state_dict(model.state_dict())
    idx = torch.randint(0, 65, (2, 32), generator=torch.Generator().manual_seed(1))
    train = TrainConfig(out_dir="unused", max_steps=1, batch_size=2, tp=2, device="cpu", backend=backend,
                        compile=compile_)
    with parallelize(model, train, "fsdp", torch.device("cpu"), MeshShape(tp=2)) as module:
        compiled = all(block._compiled_call_impl is not None for block in model.blocks)
        with loss_context(model):
            loss = module(idx, idx).loss
            loss.backward()
        grads = fuse_qkv({n: p.grad.full_tensor() for n, p in model.named_parameters()})
    expected = reference(idx, idx).loss
    expected.backward()
    result = {"compiled": compiled, "loss": abs(loss.full_tensor() - expected).item(),
              "grad": max((grads[n] - p.grad).abs().max().item() for n, p in reference.named_parameters())}
    if info.rank == 0:  # one process writes: lines printed by several at once can interleave
        print(json.dumps(result), flush=True)
"""


@pytest.mark.parametrize("backend, compile_", [("triton", False), ("sdpa", True)], ids=["triton", "compiled"])
def test_tensor_parallel_kernels_and_compiled_blocks_give_the_math_backends_loss_and_gradients(
        tmp_path, backend, compile_):
    """tp=2 against one process on the math backend, within fp32 rounding (1e-5). With
    backend='triton' (the kernels interpreted on the CPU), attention gets each rank's whole
    heads as plain tensors and LayerNorm runs on each rank's rows of the sequence (its gain's
    and bias's gradients summed across ranks); with compile, each block is compiled after
    tensor parallelism splits it (torchtitan's order)."""
    script = tmp_path / "tp_worker.py"
    script.write_text(TP_WORKER)
    env = {**child_env(), "TRITON_INTERPRET": "1"} if backend == "triton" else child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           backend, "compile" if compile_ else "eager"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = [line for line in done.stdout.splitlines() if line.startswith("{")]
    differences = json.loads(result)
    assert differences["compiled"] == compile_
    assert differences["loss"] < 1e-5 and differences["grad"] < 1e-5, differences
