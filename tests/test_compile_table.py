"""The sm_90 compile tables (scripts/compile_table.py, committed in benchmarks/results/), one per
Triton version the project runs with: 3.9 (this machine's) and 3.6 (the lent GPU machine's).

A table is made without a GPU: Triton compiles each kernel for sm_90 and ptxas -v reports
registers and spills. These tests keep both honest: no spill at a configuration a GPT
preset uses, and the tiles in each table are the ones the launchers choose today (so
changing a tile without regenerating the tables fails here). A live compile of one preset
configuration runs where Triton's ptxas is present (marked slow: ~10 s).
"""
from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.checkout import pythonpath

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TABLES = {"3.9": RESULTS / "compile_table_sm90.json", "3.6": RESULTS / "compile_table_sm90_triton36.json"}
"""Triton version -> its table (`--name compile_table_sm90_triton36` under Triton 3.6)."""
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _rows(version: str) -> list[dict]:
    table = json.loads(TABLES[version].read_text())
    assert table["environment"]["triton"].startswith(version), table["environment"]
    return table["rows"]


@pytest.mark.parametrize("version", TABLES)
def test_compile_table_has_no_spills_at_preset_configurations(version):
    rows = [r for r in _rows(version) if r["preset"]]
    assert rows
    failed = [r for r in rows if "error" in r]
    assert not failed, failed[:3]
    spills = [(r["kernel"], r["dtype"], r["head_dim"], r["mode"], r["spill_stores"]) for r in rows if r["spill_stores"]]
    assert not spills, f"register spills at preset configurations: {spills}"


@pytest.mark.parametrize("version", TABLES)
def test_compile_table_matches_the_launchers_tiles(version):
    attn = importlib.import_module("minigpt_kernels.attention")
    ln = importlib.import_module("minigpt_kernels.layer_norm")
    rows = _rows(version)
    for r in rows:
        if r["kernel"].startswith("layer_norm_bwd_dx"):
            _, block_n, warps = ln.bwd_dx_launch(int(r["mode"].removeprefix("N=")))
            assert (r["tile"], r["num_warps"]) == (f"1x{block_n}", warps), r
        if not r["kernel"].startswith("attention_") or r["kernel"] == "attention_bwd_preprocess":
            continue
        tiles = attn.attention_tiles(r["head_dim"], DTYPES[r["dtype"]], interpreter=False)
        cfg = {"attention_fwd": tiles.fwd, "attention_bwd_dkdv": tiles.bwd_dkdv, "attention_bwd_dq": tiles.bwd_dq}[r["kernel"]]
        assert r["tile"] == f"{cfg.block_m}x{cfg.block_n}", r
        assert (r["num_warps"], r["num_stages"]) == (cfg.num_warps, cfg.num_stages), r


_LIVE_CHECK = """
import importlib, sys
sys.path.insert(0, "scripts")
import torch
ct = importlib.import_module("compile_table")
if not ct.ptxas_path().exists():
    print("NO_PTXAS")
    raise SystemExit(0)
cfg = ct.attn.attention_tiles(96, torch.bfloat16, interpreter=False).fwd
fn = ct.attn._attention_fwd_kernel
consts = dict(HEAD_DIM=96, BLOCK_D=128, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=True, WINDOW=256,
              DOT_PRECISION="tf32", **ct._strides_one(fn))
print(ct.compile_one(fn, "bf16", consts, cfg.num_warps, cfg.num_stages, {"LSE_ptr": "*fp32"}))
"""


@pytest.mark.slow
def test_preset_attention_configuration_compiles_for_sm90_without_spills():
    # In a fresh interpreter: the tests run the kernels under TRITON_INTERPRET=1, which
    # Triton reads when the kernels are decorated, and compiling needs it unset.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = pythonpath()
    out = subprocess.run([sys.executable, "-c", _LIVE_CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    if "NO_PTXAS" in out.stdout:
        pytest.skip("Triton's ptxas is not installed")
    result = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert result["spill_stores"] == 0, result
