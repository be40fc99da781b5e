"""The model with backend='triton' (fused attention + LayerNorm) against the math reference.

On a CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so the model is tiny; on a GPU the same test runs natively.
"""
import pytest
import torch

from minigpt import GPT, GPTConfig
from tests.helpers import randomize_

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 end to end; relative to the norm of the reference (as for the kernels).
REL_TOL = 1e-4


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_triton_matches_math(config: GPTConfig, idx: torch.Tensor) -> None:
    """The same random weights under both backends give the same logits and every gradient."""
    results = {}
    for backend in ("math", "triton"):
        model = randomize_(GPT(config), seed=0, std=0.1).to(DEVICE)
        model.set_backend(backend)
        out = model(idx, idx)
        out.loss.backward()
        results[backend] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    logits, grads = results["triton"]
    assert rel_err(logits, results["math"][0]) < REL_TOL
    for name, g in results["math"][1].items():
        assert rel_err(grads[name], g) < REL_TOL, name


@pytest.mark.parametrize("pattern, window", [(("dense", "banded"), 3), (("banded",), 40)])
def test_triton_backend_matches_math_on_logits_and_gradients(pattern, window):
    config = GPTConfig(vocab_size=37, block_size=24, n_layer=2, n_head=2, n_embd=32,
                       attention_pattern=pattern, attention_window=window)
    idx = torch.randint(0, 37, (2, 19), device=DEVICE)
    assert_triton_matches_math(config, idx)


@pytest.mark.parametrize(
    "n_head, n_embd, pattern",
    [(2, 160, ("dense", "banded")), (1, 96, ("banded", "dense"))],
    ids=["head_dim80-gpt3-2.7b", "head_dim96-gpt3-large"],
)
def test_triton_backend_matches_math_with_padded_head_dims(n_head, n_embd, pattern):
    # gpt3-2.7b (head dim 80) and gpt3-large (96) reach the kernel, which pads D to a
    # power of two; logits and every gradient match the math path.
    from minigpt import ops

    config = GPTConfig(vocab_size=37, block_size=24, n_layer=2, n_head=n_head, n_embd=n_embd,
                       attention_pattern=pattern, attention_window=5)
    assert ops._kernel_head_dim_ok(config.head_dim)
    idx = torch.randint(0, 37, (1, 13), device=DEVICE)
    assert_triton_matches_math(config, idx)


def test_triton_backend_without_cuda_or_interpreter_falls_back_and_logs(monkeypatch, caplog):
    if DEVICE == "cuda":
        pytest.skip("the fallback applies only without CUDA")
    from minigpt import ops

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ops._log_once.cache_clear()
    config = GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config, backend="triton")
    idx = torch.randint(0, 37, (1, 9))
    with caplog.at_level("INFO", logger="minigpt.ops"):
        for _ in range(3):
            out = model(idx).logits
    torch.testing.assert_close(out, model.set_backend("sdpa")(idx).logits)
    messages = [r.message for r in caplog.records if "needs CUDA" in r.message]
    assert len(messages) == 1


def test_triton_backend_with_an_unsupported_head_dim_uses_sdpa_for_attention(caplog):
    from minigpt import ops

    ops._log_once.cache_clear()
    config = GPTConfig(vocab_size=37, block_size=16, n_layer=1, n_head=4, n_embd=32)  # head_dim 8
    model = randomize_(GPT(config), std=0.1).to(DEVICE)
    idx = torch.randint(0, 37, (1, 9), device=DEVICE)
    with caplog.at_level("INFO", logger="minigpt.ops"):
        out = model.set_backend("triton")(idx).logits
    assert rel_err(out, model.set_backend("math")(idx).logits) < REL_TOL
    assert any("not 8" in r.message for r in caplog.records)
