"""scripts/gpu_suite.py --smoke runs every stage of the GPU suite on the CPU (tiny sizes, Triton
interpreted, torch.compile disabled) and writes a report holding each; without this the
script, which only a lent GPU runs for real, would rot unseen."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
import gpu_suite  # noqa: E402
import gpu_suite_report  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu_suite")
    # Through the shell wrapper, the command a GPU session types.
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_suite.sh"), "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def test_gpu_suite_smoke_runs_every_stage_ok(smoke_run: Path):
    report = json.loads((smoke_run / "results.json").read_text())
    stages = report["stages"]
    assert list(stages) == [name for name, _, _ in gpu_suite.STAGES]
    failed = {k: v.get("log_tail") for k, v in stages.items() if v["status"] != "ok"}
    assert not failed, failed
    assert report["suite"]["smoke"] is True


def test_gpu_suite_smoke_records_every_figure(smoke_run: Path):
    stages = json.loads((smoke_run / "results.json").read_text())["stages"]
    assert {"device", "torch", "triton", "commit", "matplotlib"} <= set(stages["environment"]["result"])
    assert {"matmul_bf16_tflops", "copy_gbps"} <= set(stages["ceilings"]["result"])
    for name in ("tests_kernels", "tests_rest"):
        assert stages[name]["result"]["passed"] > 0 and not stages[name]["result"]["failed"]
    attention = stages["attention"]["result"]["rows"]
    assert {r["provider"] for r in attention} >= {"triton", "sdpa_flash", "sdpa_cudnn", "flex", "math"}
    assert {r["mask"] for r in attention} == {"causal", "banded"}
    assert any("frac_of_matmul_peak" in r for r in attention if r["provider"] == "triton")
    layer_norm = stages["layer_norm"]["result"]["rows"]
    assert {r["provider"] for r in layer_norm} == {"triton", "torch", "torch_compile"}
    assert all("frac_of_copy_bw" in r for r in layer_norm)
    train = [r for r in stages["train"]["result"]["rows"] if r["variant"] == "minigpt"]
    assert {(r["backend"], r["compile"]) for r in train} >= {("triton", False), ("sdpa", False), ("sdpa", True)}
    assert all(r["mfu"] is not None and "mfu_measured_peak" in r for r in train)


def test_gpu_suite_smoke_writes_the_summary(smoke_run: Path):
    summary = (smoke_run / "summary.md").read_text()
    assert "Smoke run" in summary
    for name, _, _ in gpu_suite.STAGES:
        assert f"| {name} | ok |" in summary
    for heading in ("Measured ceilings", "The GPU issue's targets", "Attention", "LayerNorm", "Training",
                    "Attention tile sweep"):
        assert f"## {heading}" in summary
    assert (smoke_run / "suite.log").stat().st_size > 0


def test_gpu_suite_prints_its_plan_first_and_the_targets_last(smoke_run: Path):
    lines = (smoke_run / "stdout.txt").read_text().splitlines()
    assert lines[0].startswith("[gpu_suite] plan (custom) (smoke): 8 stages")
    assert [line.split()[1] for line in lines[1:9]] == [name for name, _, _ in gpu_suite.STAGES]
    tail = "\n".join(lines[-40:])
    assert "figures against the targets" in tail and "| target | case | figure | goal | verdict |" in tail


def test_gpu_suite_smoke_sweeps_tiles_and_checks_each_against_the_default(smoke_run: Path):
    tiles = json.loads((smoke_run / "results.json").read_text())["stages"]["attention_tiles"]["result"]
    rows = tiles["rows"]
    assert {(r["mask"], r["pass"]) for r in rows} == {(m, p) for m in ("causal", "banded")
                                                       for p in ("fwd", "bwd_dkdv", "bwd_dq")}
    assert sum(r["default"] for r in rows) == 6 and len(rows) == tiles["planned"] == 12
    assert all("ms" in r and r["max_abs_diff_vs_default"] < 1e-4 for r in rows), rows  # fp32, interpreted
    assert len(tiles["best"]) == 6


def test_the_two_plans_fit_a_fifteen_minute_lease():
    # A lease: 15 minutes of device time, a 1-2 minute start, at most 10 minutes a command.
    budgets = {name: gpu_s for name, gpu_s, _ in gpu_suite.STAGES}
    for plan, (limit, stages) in gpu_suite.PLANS.items():
        assert sum(budgets[s] for s in stages) <= limit, plan
    assert gpu_suite.PLANS["first"][0] <= 7 * 60 and gpu_suite.PLANS["second"][0] <= 4 * 60
    every = [s for _, stages in gpu_suite.PLANS.values() for s in stages]
    assert set(every) == set(budgets)  # every stage runs in one of the two commands


def test_gpu_suite_merge_joins_the_two_commands(tmp_path: Path):
    script = str(ROOT / "scripts" / "gpu_suite.py")
    for name, stage in (("first", "environment"), ("second", "ceilings")):
        proc = subprocess.run([sys.executable, script, "--smoke", "--out", str(tmp_path / name), "--stages", stage],
                              cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, script, "--merge", str(tmp_path / "first"), str(tmp_path / "second"),
                           "--out", str(tmp_path / "merged")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert [k for k, v in report["stages"].items() if v["status"] == "ok"] == ["environment", "ceilings"]
    assert len(report["suite"]["merged_from"]) == 2
    assert (tmp_path / "merged" / "suite-first.log").is_file() and (tmp_path / "merged" / "summary.md").is_file()


def test_a_pytest_stage_past_its_budget_still_writes_its_junit(tmp_path: Path):
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_quick():\n    pass\n\n"
                                           "def test_slow():\n    time.sleep(600)\n")
    log = tmp_path / "suite.log"
    log.write_text("")
    junit = tmp_path / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               str(tmp_path / "test_slow.py")]
    # With SIGINT ignored here, as in a suite started in the background or after a library
    # ignored it: the child inherits that unless _run_child lets SIGINT through, and is then
    # killed without a junit (how this test once failed in a fresh virtualenv).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code, tail = gpu_suite._run_child(command, 20.0, log, dict(os.environ))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code is None and "killed after its budget" in tail
    summary = gpu_suite._junit_summary(junit)
    assert summary.get("passed", 0) >= 1, (summary, tail)


def test_gpu_suite_without_matplotlib_skips_the_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    report = {"suite": {"smoke": True}, "stages": {}}
    assert gpu_suite_report.plot(report, tmp_path / "results.png").startswith("skipped: matplotlib")
    assert not (tmp_path / "results.png").exists()


def test_gpu_suite_without_cuda_says_use_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_suite.main(["--out", str(tmp_path)]) == 2
    assert "--smoke" in capsys.readouterr().err


def test_gpu_suite_kills_a_stage_past_its_budget(tmp_path: Path):
    log = tmp_path / "suite.log"
    log.write_text("")
    code, tail = gpu_suite._run_child([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                      0.5, log, dict(os.environ))
    assert code is None
    assert "started" in tail and "killed after its budget" in tail


def test_gpu_suite_records_a_failing_stage_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(gpu_suite, "_pytest_command",
                        lambda stage, out, smoke: [sys.executable, "-c", "raise SystemExit('collection broke')"])
    args = gpu_suite.argparse.Namespace(out=tmp_path, smoke=True, commit=None)
    (tmp_path / "suite.log").write_text("")
    report = {"suite": {"command": "test", "smoke": True, "started": "now"}, "stages": {}}
    gpu_suite.run_stage("tests_kernels", 60, args, report)
    stage = report["stages"]["tests_kernels"]
    assert stage["status"] == "failed" and stage["returncode"] == 1
    assert "collection broke" in stage["log_tail"]
    summary = gpu_suite_report.render_summary(report)
    assert "| tests_kernels | failed |" in summary and "collection broke" in summary


def test_gpu_suite_keep_adds_the_stages_of_a_second_call(tmp_path: Path):
    script = str(ROOT / "scripts" / "gpu_suite.py")
    for extra in ([], ["--keep"]):
        stage = "ceilings" if extra else "environment"
        proc = subprocess.run([sys.executable, script, "--smoke", "--out", str(tmp_path), "--stages", stage, *extra],
                              cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    assert [k for k, v in report["stages"].items() if v["status"] == "ok"] == ["environment", "ceilings"]
    assert len(report["suite"]["earlier_commands"]) == 1


def test_tile_sweep_compiles_in_worker_processes(monkeypatch: pytest.MonkeyPatch):
    # The sweep's first half on the GPU: spawned workers launch every planned tile once. Here
    # the same pool runs under the interpreter (it inherits TRITON_INTERPRET and sys.path).
    import torch

    from benchmarks import bench_attention_tiles as tiles

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cells = tiles.plan(tiles.SMOKE_SHAPES, torch.float32, tiles.SMOKE_CANDIDATES, None)
    jobs = list(tiles.round_robin(cells))
    assert len(jobs) == 12 and jobs[0][3] == tiles.default_config(16, torch.float32, "fwd")
    done = tiles.compile_in_parallel(jobs, torch.float32, workers=2, budget_s=120, device="cpu", warm_t=32)
    assert done["compiled"] == done["jobs"] == 12 and done["workers"] == 2
