"""The model does not know how it is run (issue 16): it compiles as one graph, its backend
is set from outside by one function, and its modules do not import each other."""
import ast
from pathlib import Path

import pytest
import torch

from minigpt import GPT, GPTConfig, ops
from minigpt.model import CausalSelfAttention, LayerNorm
from tests.helpers import randomize_

ROOT = Path(__file__).resolve().parents[1]


def config(pattern: tuple[str, ...] = ("dense", "banded"), window: int = 8) -> GPTConfig:
    return GPTConfig(vocab_size=61, block_size=48, n_layer=2, n_head=2, n_embd=16, attention_pattern=pattern,
                     attention_window=window)


def model_for(cfg: GPTConfig) -> GPT:
    torch.manual_seed(0)
    return randomize_(GPT(cfg, backend="sdpa"), 0)


# T=20 with w=8 takes the blocked band (T > 2w), with w=16 the whole-band mask (T <= 2w).
@pytest.mark.parametrize("layer, window", [(0, 8), (1, 8), (1, 16)], ids=["dense", "banded", "banded-whole"])
def test_a_block_compiles_as_one_graph_and_matches_eager_forward_and_backward(layer, window):
    torch._dynamo.reset()
    block = model_for(config(window=window)).blocks[layer]
    x = torch.randn(2, 20, 16, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="eager")  # a graph break raises here
    expected = block(x)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    got = compiled(x)
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad_got, grad_expected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), rtol=0, atol=0)  # the unfold path of the band


def test_the_whole_gpt_forward_compiles_as_one_graph_and_matches_eager():
    torch._dynamo.reset()
    model = model_for(config()).eval()
    idx = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    got, expected = compiled(idx, targets), model(idx, targets)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)


def test_use_backend_is_the_one_writer_of_every_attention_and_norm_backend():
    model = GPT(config(), backend="math")
    modules = [m for m in model.modules() if isinstance(m, (LayerNorm, CausalSelfAttention))]
    assert len(modules) == 2 * 3 + 1 and {m.backend for m in modules} == {"math"}
    assert ops.use_backend(model, "sdpa") is model and {m.backend for m in modules} == {"sdpa"}
    assert model.set_backend("math") is model and {m.backend for m in modules} == {"math"} and model.backend == "math"
    with pytest.raises(ValueError, match="backend='flash' is not supported"):
        ops.use_backend(model, "flash")
    assert {m.backend for m in modules} == {"math"}  # nothing changed


def test_an_out_of_range_prompt_id_is_refused_by_generate_before_the_model_runs():
    model = GPT(config())
    with pytest.raises(ValueError, match="prompt 1: token id 61 is out of range for vocab_size=61"):
        model.generate([[1, 2], [3, 61]], 2)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The minigpt modules `path` imports anywhere: top level, inside functions, under TYPE_CHECKING."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found & modules


def _import_graph() -> dict[str, set[str]]:
    paths = {}
    for path in (ROOT / "minigpt").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        paths[name] = path
    return {name: _imports(path, set(paths)) for name, path in paths.items()}


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


MODEL_SIDE = ["minigpt.model", "minigpt.hooks", "minigpt.ops", "minigpt.config", "minigpt.counts", "minigpt.cache",
              "minigpt.generate", "minigpt.weights", "minigpt.experiments"]


@pytest.mark.parametrize("module", MODEL_SIDE)
def test_the_model_side_modules_are_in_no_import_cycle(module):
    graph = _import_graph()
    back = sorted(m for m in graph[module] if module in _reaches(graph, m) or m == module)
    assert not back, f"{module} imports {back}, which import {module} back"


def test_model_py_imports_neither_the_training_machinery_nor_the_cli_at_any_level():
    imported = _imports(ROOT / "minigpt" / "model.py", set(_import_graph()))
    assert not {m for m in imported if m.startswith(("minigpt.train", "minigpt.cli", "minigpt.finetune"))}


def test_no_module_under_minigpt_is_in_an_import_cycle():
    graph = _import_graph()
    cycles = sorted(f"{m} -> {n}" for m in graph for n in graph[m] if m in _reaches(graph, n))
    assert not cycles, f"modules that import each other (directly or through others): {cycles}"
