"""The same global batch gives the same gradients however it is split: one batch of 8, 4
micro-batches of 2, or 2 ranks (gloo, DDP and FSDP2) of 4 — for pretraining and for a
prompt-masked fine-tuning loss, whose rows carry different numbers of targets.

The gradients are read inside the optimizer's step (a global step pre-hook, so the loop
runs unchanged) and compared with a float64 reference: the mean cross-entropy over every
target of the global batch at once. fp32: rtol 1e-5, atol 1e-7.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from minigpt import GPT
from scripts.checkout import child_env
from tests.train.common import quick_train_config, tiny_gpt_config

GRAD_TOLERANCE = dict(rtol=1e-5, atol=1e-7)
ROWS, T = 8, 16


def global_batch(masked: bool) -> dict[str, torch.Tensor]:
    """8 rows of token ids and next-token targets; masked: row i keeps only its last i + 1
    targets (a prompt-masked fine-tuning batch), the rest -100."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 65, (ROWS, T + 1), generator=g)
    targets = tokens[:, 1:].clone()
    if masked:
        for i in range(ROWS):
            targets[i, : T - (i + 1)] = -100
    return {"idx": tokens[:, :-1].contiguous(), "targets": targets}


class SplitBatches:
    """The rows of `global_batch` this rank reads, `batch_size` at a time, every update the same."""

    def __init__(self, masked: bool, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        whole = global_batch(masked)
        share = ROWS // world_size
        self.rows = {k: v[rank * share:(rank + 1) * share] for k, v in whole.items()}
        self.batch_size, self.next = batch_size, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        start = self.next * self.batch_size % self.rows["idx"].shape[0]
        self.next += 1
        return {k: v[start:start + self.batch_size] for k, v in self.rows.items()}

    def state_dict(self) -> dict:
        return {"next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.next = state["next"]


def first_update_gradients(out_dir: Path, masked: bool, batch_size: int, grad_accum: int,
                           rank: int = 0, world_size: int = 1, parallel: str = "auto") -> dict[str, torch.Tensor]:
    """The gradients the loop hands its optimizer at the first update, by parameter name."""
    from minigpt.finetune.tasks import masked_lm_loss
    from minigpt.train import train
    from minigpt.train.loop import language_model_loss
    from minigpt.train.parallel import fuse_qkv

    torch.manual_seed(0)
    model = GPT(tiny_gpt_config(n_embd=16, block_size=T))
    seen: dict[str, torch.Tensor] = {}

    def capture(optimizer, args, kwargs):
        if not seen:  # named now: FSDP2 has replaced the parameters by sharded ones
            names = {id(p): n for n, p in model.named_parameters()}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                    seen[names[id(p)]] = grad.detach().clone()

    handle = register_optimizer_step_pre_hook(capture)
    try:
        config = quick_train_config(out_dir, max_steps=1, batch_size=batch_size, grad_accum=grad_accum,
                                    grad_clip=0.0, parallel=parallel, checkpoint_interval=0)
        train(model, config, SplitBatches(masked, batch_size, rank, world_size),
              loss_fn=masked_lm_loss if masked else language_model_loss)
    finally:
        handle.remove()
    return fuse_qkv(seen)  # under FSDP the qkv projection is split (minigpt.train.parallel)


def reference_gradients(masked: bool) -> dict[str, torch.Tensor]:
    """float64: the mean cross-entropy over every target of the global batch, at once."""
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config(n_embd=16, block_size=T)).double()
    batch = global_batch(masked)
    logits = model(batch["idx"]).logits
    F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _assert_gradients_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], **GRAD_TOLERANCE,
                                   msg=lambda m: f"{what}, {name}: {m}")


@pytest.mark.parametrize("masked", [False, True], ids=["pretraining", "masked"])
def test_one_batch_and_micro_batches_give_the_global_batchs_gradients(tmp_path, masked):
    want = reference_gradients(masked)
    _assert_gradients_equal(first_update_gradients(tmp_path / "1x8", masked, 8, 1), want, "1 x 8")
    _assert_gradients_equal(first_update_gradients(tmp_path / "4x2", masked, 2, 4), want, "4 micro-batches of 2")


def test_the_mean_of_micro_batch_means_would_differ_on_masked_rows():
    """What the check above guards against: averaging the four micro-batches' means (the
    loop's old rule) weighs a target of the 2-target micro-batch 7 times one of the
    14-target micro-batch's, which moves the gradient far beyond the tolerance."""
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config(n_embd=16, block_size=T)).double()
    batch = global_batch(masked=True)
    loss = sum(F.cross_entropy(model(batch["idx"][i:i + 2]).logits.flatten(0, 1),
                               batch["targets"][i:i + 2].flatten(), ignore_index=-100) for i in range(0, ROWS, 2)) / 4
    loss.backward()
    want = reference_gradients(masked=True)
    worst = max(((p.grad - want[n]).abs().max() / want[n].abs().max()).item() for n, p in model.named_parameters())
    assert worst > 1e-2


WORKER = """
import sys, json, torch
from pathlib import Path
from minigpt.train import distributed as dist_
from tests.train.test_loss_weighting import first_update_gradients
out, masked, parallel = Path(sys.argv[1]), sys.argv[2] == "masked", sys.argv[3]
with dist_.process_group("cpu") as info:
    grads = first_update_gradients(out / "run", masked, 4, 1, info.rank, info.world_size, parallel)
if info.rank == 0:
    torch.save(grads, out / "grads.pt")
"""


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("masked", [False, True], ids=["pretraining", "masked"])
def test_two_ranks_give_the_global_batchs_gradients(tmp_path, masked, parallel):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path), "masked" if masked else "plain", parallel]
    env = child_env()
    env["PYTHONPATH"] = f"{Path(__file__).resolve().parents[2]}:{env['PYTHONPATH']}"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_gradients_equal(torch.load(tmp_path / "grads.pt"), reference_gradients(masked), f"2 ranks x 4 ({parallel})")
