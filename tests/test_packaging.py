"""What minigpt installs is its own: no import name of another distribution, nothing at the
repository root that hides one, and a wheel that works beside `transformers`.

Why this file exists: the Triton kernels used to be a top-level package `kernels`, which is
also Hugging Face's `kernels` distribution. transformers 5 imports that package whenever it is
installed (`from kernels import CUDAProperties, ...`), so every transformers model failed to
build in a checkout (the root on `sys.path` found minigpt's folder first), and a
non-editable install wrote minigpt's `kernels/` over Hugging Face's. The kernels are now
`minigpt_kernels`, inside the `kernels/` folder, which is no package itself.

The wheel is built offline from a copy of the sources (`pip wheel --no-build-isolation`, the
`[test]` extra brings setuptools) and installed with `--no-deps --target` into a scratch
folder, so nothing here touches the environment or the network.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from minigpt.pretrain.corpora import TINY_SHAKESPEARE_CHARS, TINY_SHAKESPEARE_SHA256
from scripts.checkout import ROOT, pythonpath

SOURCES = ("pyproject.toml", "README.md", "minigpt", "kernels")
"""What setuptools reads to build the wheel (copied, so the build writes nothing into the checkout)."""


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the PYTHONPATH pytest's caller may have set."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """minigpt's wheel, built offline from a copy of this checkout's sources."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(path, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(work / "dist"), str(source)], cwd=work)
    (found,) = (work / "dist").glob("minigpt-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A folder the wheel is installed into, as `pip install .` would install it (no dependencies)."""
    target = tmp_path_factory.mktemp("site")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
          str(wheel)], cwd=target)
    return target


def top_level_names(wheel: Path) -> set[str]:
    """The import names a wheel installs: its top-level packages and modules."""
    names = set()
    for entry in zipfile.ZipFile(wheel).namelist():
        first = entry.split("/")[0]
        if first.endswith((".dist-info", ".data")):
            continue
        names.add(first.removesuffix(".py") if "/" not in entry else first)
    return names


def other_owners(name: str) -> list[str]:
    """The installed distributions other than minigpt that provide the top-level import `name`."""
    return [d for d in importlib.metadata.packages_distributions().get(name, []) if d.lower() != "minigpt"]


def test_every_import_name_the_wheel_installs_is_ours_alone(wheel):
    names = top_level_names(wheel)
    assert "minigpt" in names and "minigpt_kernels" in names, names
    clashes = {name: other_owners(name) for name in sorted(names) if other_owners(name)}
    assert not clashes, f"the wheel installs import names that other installed distributions own: {clashes}"


def test_the_wheel_ships_the_main_jobs_corpus_intact(wheel):
    data = zipfile.ZipFile(wheel).read("minigpt/pretrain/corpus/tinyshakespeare.txt")
    assert len(data.decode("ascii")) == TINY_SHAKESPEARE_CHARS
    assert hashlib.sha256(data).hexdigest() == TINY_SHAKESPEARE_SHA256


def test_the_wheel_ships_the_cpu_kernels_source(wheel):
    # Without it decoding quietly falls back to oneDNN (minigpt.cpu_decode).
    source = zipfile.ZipFile(wheel).read("minigpt/cpu_decode.c")
    assert source == (Path(__file__).resolve().parents[1] / "minigpt" / "cpu_decode.c").read_bytes()


def test_nothing_at_the_repository_root_hides_an_installed_distribution():
    # From a checkout (pytest's rootdir, `python -m ...`, any `python` started there) the root
    # is first on sys.path: a package or module there would win over an installed one of the
    # same name. A folder without __init__.py (kernels/, tests/) loses to a regular package.
    installed = importlib.metadata.packages_distributions()
    shadows = sorted(name for name in installed if other_owners(name)
                     and ((ROOT / name / "__init__.py").is_file() or (ROOT / f"{name}.py").is_file()))
    assert not shadows, f"the repository root holds packages named like installed distributions: {shadows}"


_BUILD_GPT2 = textwrap.dedent("""
    import importlib.util, sys
    import transformers
    spec = importlib.util.find_spec("kernels")
    print("kernels:", None if spec is None else spec.origin)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=8))
    print("built", type(model).__name__)
""")


def test_transformers_builds_a_gpt2_from_inside_the_repository_root():
    # As the suite, `python -m pytest` and `python -m scripts...` see it: the root and kernels/
    # first on sys.path, Hugging Face's `kernels` installed beside transformers.
    out = _run([sys.executable, "-c", _BUILD_GPT2], cwd=ROOT, env=_clean_env(PYTHONPATH=pythonpath()))
    assert "built GPT2LMHeadModel" in out
    origin = out.split("kernels:", 1)[1].split()[0]
    assert origin == "None" or not Path(origin).resolve().is_relative_to(ROOT), \
        f"`import kernels` from the repository root finds {origin}, inside the checkout"


def test_the_installed_wheel_works_beside_transformers_and_trains_the_main_job(installed, tmp_path):
    # Outside the checkout, with only the installed wheel on the path: both of minigpt's
    # packages come from it, `kernels` is not minigpt's, transformers builds a model, and the
    # main job finds its shipped corpus (a two-update run).
    code = textwrap.dedent(f"""
        import importlib.util, sys
        import minigpt, minigpt_kernels
        for module in (minigpt, minigpt_kernels):
            assert module.__file__.startswith({str(installed)!r}), module.__file__
        spec = importlib.util.find_spec("kernels")
        assert spec is None or not (spec.origin or "").startswith({str(installed)!r}), spec.origin
    """) + _BUILD_GPT2
    env = _clean_env(PYTHONPATH=str(installed))
    assert "built GPT2LMHeadModel" in _run([sys.executable, "-c", code], cwd=tmp_path, env=env)
    run = tmp_path / "run"
    _run([sys.executable, "-m", "minigpt", "train", "--out-dir", str(run), "--max_steps=2", "--eval_interval=2",
          "--eval_steps=1", "--sample.tokens=3", "--progress=false", "--threads=1"], cwd=tmp_path, env=env)
    assert (run / "checkpoints" / "best" / "config.json").is_file()
