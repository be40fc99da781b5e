"""Muon with AdamW: the Newton-Schulz orthogonalization against an SVD in float64, the
Muon update against a float64 restatement of its rule, the AdamW part against torch's
AdamW, and the split of a GPT's parameters between the two."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt import GPT
from minigpt.train import TrainConfig, build_optimizer
from minigpt.train import muon
from minigpt.train.muon import MuonWithAdamW, iteration_dtype, orthogonalize
from tests.tolerances import NEWTON_SCHULZ_ATOL
from tests.train.common import tiny_gpt_config


@settings(deadline=None, max_examples=25)
@given(rows=st.integers(1, 48), cols=st.integers(1, 48), seed=st.integers(0, 2**16))
def test_orthogonalize_keeps_singular_vectors_and_pulls_singular_values_towards_one(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    matrix = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    out = orthogonalize(matrix.float(), dtype=torch.float32).double()
    assert out.shape == matrix.shape and out.dtype == torch.float64
    # In the singular basis of the input the output is diagonal: same singular vectors ...
    core = u.T @ out @ vh.T
    diagonal = torch.diagonal(core)
    off = core - torch.diag(diagonal)
    assert off.abs().max() < 1e-4
    # ... and singular values in the band the quintic iteration is designed for, for every
    # direction that is not negligible against the largest one.
    significant = s > 1e-2 * s[0]
    assert ((diagonal[significant] > 0.5) & (diagonal[significant] < 1.3)).all(), diagonal


def _reference_muon(weight, grads, lr, momentum, weight_decay):
    """Muon restated in float64: Nesterov momentum, Newton-Schulz, RMS-matched step."""
    w, buffer = weight.double().clone(), torch.zeros_like(weight, dtype=torch.float64)
    for grad in grads:
        grad = grad.double()
        w *= 1 - lr * weight_decay
        buffer = momentum * buffer + grad
        x = grad + momentum * buffer
        x = x.T if x.shape[0] > x.shape[1] else x
        x = x / x.norm()
        for _ in range(5):
            a = x @ x.T
            x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
        x = x.T if weight.shape[0] > weight.shape[1] else x
        w -= lr * 0.2 * math.sqrt(max(weight.shape)) * x
    return w


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(24, 8), (8, 24), (16, 16), (3, 16, 16), (3, 24, 8), (3, 8, 24)])
def test_muon_update_matches_a_float64_restatement(shape, ns_dtype):
    """Three matrices of one shape are one stack: each must come out as if alone."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(w) for w in torch.randn(shape).reshape(-1, *shape[-2:])]
    grads = [[torch.randn(shape[-2:]) for _ in weights] for _ in range(4)]
    expected = [_reference_muon(w.detach(), [g[i] for g in grads], lr=0.01, momentum=0.95, weight_decay=0.1)
                for i, w in enumerate(weights)]
    optimizer = MuonWithAdamW([{"params": weights, "muon": True, "weight_decay": 0.1}], lr=0.01, ns_dtype=ns_dtype)
    for step_grads in grads:
        for w, g in zip(weights, step_grads):
            w.grad = g.clone()
        optimizer.step()
    for w, e in zip(weights, expected):
        torch.testing.assert_close(w.detach().double(), e, rtol=0, atol=NEWTON_SCHULZ_ATOL[ns_dtype])


def test_iteration_dtype_is_bfloat16_only_where_the_cpu_multiplies_it_natively(monkeypatch, request):
    request.addfinalizer(muon._cpu_multiplies_bf16.cache_clear)  # the real CPU's answer again after the test
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    muon._cpu_multiplies_bf16.cache_clear()
    assert iteration_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    muon._cpu_multiplies_bf16.cache_clear()
    assert iteration_dtype(torch.device("cpu")) == torch.float32
    assert iteration_dtype(torch.device("cuda")) == torch.bfloat16
    assert iteration_dtype(torch.device("meta")) == torch.float32  # neither: float32


def test_a_non_float_iteration_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="ns_dtype=torch.int32 must be a floating-point"):
        MuonWithAdamW([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "muon": True}], lr=0.01, ns_dtype=torch.int32)


def test_orthogonalize_takes_empty_stacks_and_stacks_of_stacks():
    assert orthogonalize(torch.zeros(0, 16, 4)).shape == (0, 16, 4)
    matrices = torch.randn(2, 3, 8, 5, dtype=torch.float64)
    out = orthogonalize(matrices.float(), dtype=torch.float32).double()
    for i in range(2):
        for j in range(3):
            alone = orthogonalize(matrices[i, j].float(), dtype=torch.float32).double()
            torch.testing.assert_close(out[i, j], alone, rtol=0, atol=1e-5)


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    groups = lambda ps: [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]
    mine = MuonWithAdamW(groups(ours), lr=3e-3, betas=(0.9, 0.99))
    reference = torch.optim.AdamW(groups(theirs), lr=3e-3, betas=(0.9, 0.99))
    for _ in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        mine.step()
        reference.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_state_dict_round_trips_and_refuses_another_layout():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))]
    build = lambda ps: MuonWithAdamW([{"params": [ps[0]], "muon": True}, {"params": [ps[1]]}], lr=1e-2)
    first = build(params)
    for p in params:
        p.grad = torch.randn_like(p)
    first.step()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    second = build(copies)
    second.load_state_dict(first.state_dict())
    for optimizer, ps in ((first, params), (second, copies)):
        for p in ps:
            p.grad = torch.ones_like(p)
        optimizer.step()
    for a, b in zip(params, copies):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"groups of \[1, 1\] parameters, this optimizer \[2\]"):
        MuonWithAdamW([{"params": params}], lr=1e-2).load_state_dict(first.state_dict())


def test_muon_does_not_import_torch_dynamo():
    """The reason it is not a torch.optim.Optimizer: ~150 MB of resident memory on the main job."""
    import subprocess
    import sys

    code = ("import sys, torch\nfrom minigpt.train.muon import MuonWithAdamW\n"
            "p = torch.nn.Parameter(torch.ones(3, 3)); p.grad = torch.ones(3, 3)\n"
            "MuonWithAdamW([{'params': [p], 'muon': True}], lr=0.1).step()\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_grad_scaler_unscales_before_the_update():
    """The loop's fp16 path: GradScaler.unscale_/step/update on this optimizer (CPU here)."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(6, 4)) for _ in range(2)]
    plain = MuonWithAdamW([{"params": [weights[0]], "muon": True}], lr=1e-2)
    scaled = MuonWithAdamW([{"params": [weights[1]], "muon": True}], lr=1e-2)
    weights[1].data.copy_(weights[0].data)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(3, 6)
    (x @ weights[0]).square().sum().backward()
    scaler.scale((x @ weights[1]).square().sum()).backward()
    plain.step()
    scaler.unscale_(scaled)
    scaler.step(scaled)
    scaler.update()
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=1e-6)


def test_muon_refuses_vectors_naming_the_shape():
    with pytest.raises(ValueError, match=r"shape \(7,\).*muon=False"):
        MuonWithAdamW([{"params": [torch.nn.Parameter(torch.zeros(7))], "muon": True}], lr=1e-3)


def test_muon_takes_block_matrices_and_adamw_the_rest(tmp_path):
    model = GPT(tiny_gpt_config())
    config = TrainConfig(out_dir=str(tmp_path), max_steps=1, batch_size=1, optimizer="muon")
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.param_groups if g["muon"] for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.param_groups if not g["muon"] for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert "tok_emb.weight" in adamw and "pos_emb.weight" in adamw and "blocks.0.ln_1.weight" in adamw
    assert not muon & adamw


def test_muon_with_fsdp_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="optimizer='muon' cannot be used with parallel='fsdp'"):
        TrainConfig(out_dir=str(tmp_path), max_steps=1, batch_size=1, optimizer="muon", parallel="fsdp")


def test_a_step_on_threads_equals_a_step_in_turn_bit_for_bit():
    """`run_jobs` given a thread pool's map (as the training loop does under
    cpu_parallel='micro_batches'): the stacks and the AdamW group run on the threads, and
    three updates leave the same weights as the builtin map's."""
    from concurrent.futures import ThreadPoolExecutor
    import threading

    def trained(run_jobs) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = GPT(tiny_gpt_config())
        optimizer = build_optimizer(model, TrainConfig(out_dir="unused", max_steps=3, batch_size=2, optimizer="muon",
                                                       weight_decay=0.1, device="cpu"), torch.device("cpu"))
        if run_jobs is not None:
            optimizer.run_jobs = run_jobs
        idx = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            model(idx, idx).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return model.state_dict()

    names = set()

    def recording(job):
        names.add(threading.current_thread().name)
        return muon._call(job)

    with ThreadPoolExecutor(2, thread_name_prefix="job") as pool:
        on_threads = trained(lambda call, jobs: pool.map(recording, jobs))
    want = trained(None)
    assert {n for n in names if n.startswith("job")} and "MainThread" not in names
    assert all(torch.equal(on_threads[k], want[k]) for k in want)
