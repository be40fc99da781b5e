"""torchrun with 2 CPU processes (gloo) equals one process with the same global batch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt import GPT
from minigpt.cli import main
from minigpt.train.checkpoint import load_state_dict_file
from minigpt.pretrain.config import load_config
from minigpt.pretrain.run import pretrain
from scripts.checkout import child_env
from tests.train.common import train_as_pretrain_from_init_by_name

ROOT = Path(__file__).resolve().parents[2]


def _sections(data, out_dir, batch_size, sample_tokens=0, **train):
    return {
        "model": {"vocab_size": 65, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32,
                  "attention_pattern": ["dense", "banded"], "attention_window": 8},
        "train": {"out_dir": str(out_dir), "max_steps": 4, "batch_size": batch_size, "optimizer": "adamw",
                  "lr": 3e-3, "warmup_steps": 1,
                  "eval_interval": 2, "eval_steps": 2, "log_interval": 1, "checkpoint_interval": 2,
                  "device": "cpu", "progress": False, **train},
        "data": {"path": str(data)},
        "sample": {"tokens": sample_tokens, "seed": 0},
    }


def _losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if json.loads(x)["kind"] == "train"]


def _weights(run_dir):
    return load_state_dict_file(Path(run_dir) / "checkpoints" / "latest" / "model.safetensors")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path, shakespeare_chars, parallel,
                                                                          capsys):
    """Also: the run finishes on both ranks (exit 0) with its end-of-run sample, and its
    checkpoint (under FSDP, the gathered full state with config.json) is a model folder."""
    single = tmp_path / "single"
    single_config = tmp_path / "single.json"
    single_config.write_text(json.dumps(_sections(shakespeare_chars, single, batch_size=4)))
    if parallel == "ddp":  # every rank builds the model whole, as one process does
        pretrain(load_config(file=single_config))  # both runs start from the default recipe, as `--config` does
    else:  # FSDP2 on the mesh path: each rank fills its shards from (seed, name)
        train_as_pretrain_from_init_by_name(single_config)

    config = tmp_path / "config.json"
    config.write_text(json.dumps(_sections(shakespeare_chars, tmp_path / "two", batch_size=2, sample_tokens=20,
                                           parallel=parallel)))
    env = child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "minigpt", "train", "--config", str(config)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # torchrun: every rank exited 0
    assert f"cpu x 2 (float32, {parallel}" in done.stderr  # under fsdp, the mesh follows
    latest = tmp_path / "two" / "checkpoints" / "latest"
    assert f"--- sample from {latest.resolve()} ---\n" in done.stdout and len(done.stdout.split("---\n")[1]) > 20
    assert not (tmp_path / "two" / "run.lock").exists()

    model = GPT.from_pretrained(latest)
    main(["sample", "--model", str(latest), "--prompt", "\n", "--max-new-tokens", "20", "--seed", "0"])
    assert len(capsys.readouterr().out) > 20
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], _weights(tmp_path / "two")["lm_head.weight"])

    torch.testing.assert_close(_losses(tmp_path / "two"), _losses(single), rtol=1e-5, atol=1e-6)
    two, one = _weights(tmp_path / "two"), _weights(single)
    assert two.keys() == one.keys()
    # Summation order differs between 1 and 2 processes. The key bias has a gradient of
    # rounding noise only (softmax ignores a shift shared by all keys), and Adam divides by its
    # root mean square, so those entries move by noise of about 1e-6; everything else agrees to 1e-7.
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
