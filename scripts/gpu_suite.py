"""The GPU run: environment, device ceilings, the test suite run natively, the attention,
LayerNorm and GPT-2 124M training benchmarks, a sweep of the attention kernel's tiles, and a
summary against the GPU issue's targets.

A lent GPU gives 15 minutes of device time, its 1-2 minute start included, and at most 10
minutes a command, so the suite runs as two planned commands (PLANS), from the repository
root of a checkout that is not installed (nothing can be installed there):

    scripts/gpu_suite.sh --plan first --out $OUT/first     # 7 minutes: ceilings, kernel tests, benchmarks, training
    scripts/gpu_suite.sh --plan second --out $OUT/second   # 4 minutes: the rest of the tests, the tile sweep
    python scripts/gpu_suite.py --merge DIR/first DIR/second --out benchmarks/results/<device>-<date>   # here

Each command prints its plan (every stage's budget) first and the figure-by-figure summary
against the targets last, and writes results.json (every stage's figures, status, time and
log tail), summary.md, results.png (when matplotlib is there), suite.log and the pytest junit
files. `--merge` joins the two into one report.

Each stage runs in its own process with its own time budget, so a crash (a CUDA error poisons
the process) or a timeout is recorded and the suite goes on; a stage past its budget gets
SIGINT (pytest then still writes its junit file) and, a few seconds later, SIGKILL.
results.json and summary.md are rewritten after every stage, so a run cut short still leaves
files. The most valuable results come first.

``--smoke`` runs the same code paths at tiny sizes on the CPU under TRITON_INTERPRET=1 (with
torch.compile disabled), in well under a minute; tests/test_gpu_suite_smoke.py runs it in CI so
the script cannot rot. Its figures mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a file: scripts/gpu_suite.py
    sys.path.insert(0, str(REPO_ROOT))
from scripts.checkout import IMPORT_ROOTS, child_env  # noqa: E402

# Tests that exercise the Triton kernels natively: run first, the rest of the suite last.
KERNEL_TESTS = ["tests/kernels", "tests/test_model_triton.py", "tests/test_ops_banded.py"]
SMOKE_TEST = "tests/test_gpu_suite_smoke.py"  # runs this script on the CPU: pointless on the GPU
# Smoke mode: a handful of quick tests, enough to prove the pytest plumbing.
SMOKE_KERNEL_TESTS = ["tests/kernels/test_attention_validation.py", "-k", "rejects_unsupported_dtype"]
SMOKE_REST_TESTS = ["tests/test_config.py", "-k", "preset"]

# (stage, seconds on a GPU, seconds in smoke mode), in the order they run. The GPU budgets
# are planned in benchmarks/NOTES.md ("The GPU plan") from measured compile costs.
STAGES: list[tuple[str, int, int]] = [
    ("environment", 10, 60),
    ("ceilings", 25, 60),
    ("tests_kernels", 110, 120),
    ("attention", 110, 120),
    ("layer_norm", 40, 60),
    ("train", 125, 120),
    ("tests_rest", 150, 120),
    ("attention_tiles", 80, 120),
]
PLANS: dict[str, tuple[int, list[str]]] = {
    "first": (420, ["environment", "ceilings", "tests_kernels", "attention", "layer_norm", "train"]),
    "second": (240, ["environment", "tests_rest", "attention_tiles"]),
}
"""plan -> (its command's seconds, its stages): 7 + 4 minutes of a 15-minute lease."""
TOTAL_BUDGET_S = 24 * 60
GRACE_S = 8.0
"""Seconds between a stage's SIGINT at its budget and its SIGKILL."""
TRAIN_RUNS = [(False, "triton", False), (False, "sdpa", True), (True, "sdpa", False), (True, "triton", False)]
"""(torch.compile, backend, with the transformers baseline), most valuable first: compiling is the expensive part."""

# Sizes: (GPU, smoke).
ATTENTION_SMOKE_SHAPES = [(1, 2, 64, 16)]
LAYER_NORM_SMOKE_SHAPES = [(64, 48)]
SMOKE_MATMUL, SMOKE_COPY_BYTES = 64, 2**20


# ---------------------------------------------------------------------------------------------
# Stages, each run in a child process: `gpu_suite.py --stage NAME`. A stage returns a JSON-able
# dict; the benchmark stages also save partial results after each shape, so a timeout keeps them.
# ---------------------------------------------------------------------------------------------


def _fragment(out: Path, stage: str) -> Path:
    return out / f".stage-{stage}.json"


def _save(out: Path, stage: str, result: dict) -> None:
    """Write a stage's (possibly partial) result where the parent collects it."""
    tmp = _fragment(out, stage).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(_fragment(out, stage))


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _ceilings(out: Path) -> dict:
    """The ceilings stage's figures; None where that stage failed (fractions are then left out)."""
    try:
        return json.loads((out / "results.json").read_text())["stages"]["ceilings"]["result"]
    except (OSError, KeyError, ValueError, TypeError):
        return {}


def stage_environment(out: Path, smoke: bool) -> dict:
    import torch

    from benchmarks.common import environment

    env = environment()
    if env["commit"] == "unknown" and os.environ.get("GPU_SUITE_COMMIT"):
        env["commit"] = os.environ["GPU_SUITE_COMMIT"] + " (given with --commit: no git here)"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
        )
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown (nvidia-smi not available)"
    try:
        import matplotlib

        env["matplotlib"] = matplotlib.__version__
    except ImportError:
        env["matplotlib"] = "missing: no PNG"
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    env["smoke"] = smoke
    return env


def stage_ceilings(out: Path, smoke: bool) -> dict:
    from benchmarks.common import measure_ceilings

    if smoke:
        return measure_ceilings(True, SMOKE_MATMUL, SMOKE_COPY_BYTES, device="cpu")
    return measure_ceilings()


def _bench_stage(out: Path, stage: str, run: Callable[..., list[dict]], shapes: list, smoke: bool,
                 **options: object) -> dict:
    """Run a kernel benchmark one shape at a time, saving the rows after each."""
    import torch

    dtype = torch.float32 if smoke else torch.bfloat16  # the interpreter computes bf16 dots wrongly
    ceilings = _ceilings(out) or {"matmul_bf16_tflops": float("nan"), "copy_gbps": float("nan")}
    result: dict = {"dtype": str(dtype).removeprefix("torch."), "rows": []}
    for shape in shapes:
        result["rows"] += run(dtype, quick=smoke, ceilings=ceilings, shapes=[shape], device=_device(), **options)
        _save(out, stage, result)
    return result


def stage_attention(out: Path, smoke: bool) -> dict:
    from benchmarks import bench_attention

    # The longest length first: it carries most of the targets (60% of the matmul peak, banded vs
    # dense and Flex). FlexAttention, compiled anew per length and mask, runs only there, where its
    # target is; the math reference only at the shortest length (a sanity row, not a target).
    shapes = ATTENTION_SMOKE_SHAPES if smoke else sorted(bench_attention.SHAPES, key=lambda s: -s[2])
    lengths = [s[2] for s in shapes]
    return _bench_stage(out, "attention", bench_attention.run, shapes, smoke,
                        flex_lengths={max(lengths)}, math_max_t=min(lengths))


def stage_attention_tiles(out: Path, smoke: bool) -> dict:
    import torch

    from benchmarks import bench_attention_tiles

    budget = float(os.environ.get("GPU_SUITE_STAGE_BUDGET", "80")) - 10  # leave time to write the result
    dtype = torch.float32 if smoke else torch.bfloat16
    return bench_attention_tiles.sweep(dtype=dtype, device=_device(), smoke=smoke, budget_s=budget,
                                       workers=0 if smoke else 8, save=lambda result: _save(out, "attention_tiles", result))


def stage_layer_norm(out: Path, smoke: bool) -> dict:
    from benchmarks import bench_layer_norm

    shapes = LAYER_NORM_SMOKE_SHAPES if smoke else bench_layer_norm.SHAPES
    return _bench_stage(out, "layer_norm", bench_layer_norm.run, shapes, smoke)


def stage_train(out: Path, smoke: bool) -> dict:
    """GPT-2 124M (block 1024, bf16 autocast), compile off then on, backend triton vs sdpa."""
    import torch

    from benchmarks import bench_train

    device = torch.device(_device())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    shape, warmup, iters = ("micro", 1, 1) if smoke else ("gpt2", 3, 20)
    matmul_tflops = _ceilings(out).get("matmul_bf16_tflops")
    result: dict = {"shape": shape, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for compiled, backend, baseline in TRAIN_RUNS:
            # Smoke mode disables torch.compile and interprets Triton (seconds a step): its compiled
            # runs only prove the plumbing, so they skip the Triton backend.
            if smoke and compiled and backend == "triton":
                continue
            rows = bench_train.bench_shape(shape, device, [compiled], [backend], warmup, iters, Path(tmp),
                                           baseline=baseline)
            for row in rows:
                if row.get("mfu") is not None and matmul_tflops:
                    # The same achieved FLOP/s over the matmul ceiling measured in this run.
                    row["mfu_measured_peak"] = row["mfu"] * row["peak_flops"] / (matmul_tflops * 1e12)
            result["rows"] += rows
            _save(out, "train", result)  # one (compile, backend) at a time: a run cut short keeps the rest
    return result


STAGE_FUNCTIONS: dict[str, Callable[[Path, bool], dict]] = {
    "environment": stage_environment,
    "ceilings": stage_ceilings,
    "attention": stage_attention,
    "layer_norm": stage_layer_norm,
    "train": stage_train,
    "attention_tiles": stage_attention_tiles,
}


def _pytest_command(stage: str, out: Path, smoke: bool) -> list[str]:
    junit = out / f"junit-{stage}.xml"
    if smoke:
        selection = SMOKE_KERNEL_TESTS if stage == "tests_kernels" else SMOKE_REST_TESTS
    elif stage == "tests_kernels":
        selection = KERNEL_TESTS
    else:
        selection = ["tests"] + [f"--ignore={p}" for p in KERNEL_TESTS + [SMOKE_TEST]]
    if not smoke and importlib.util.find_spec("xdist") is not None:
        # Kernel tests spend most of their time compiling kernels, the rest on the CPU: 8 workers
        # share the GPU fine. pytest-xdist is installed on the lent machines, not required.
        selection += ["-n", "8"]
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *selection]


def _junit_summary(path: Path) -> dict:
    """Counts and the failing tests' names from a pytest junit file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        return {"junit_error": f"{type(err).__name__}: {err}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "junit": path.name}


# ---------------------------------------------------------------------------------------------
# The parent: runs each stage as a child process under its budget, merges, writes the reports.
# ---------------------------------------------------------------------------------------------


def _child_env(smoke: bool, commit: str | None) -> dict[str, str]:
    env = child_env()
    if commit:
        env["GPU_SUITE_COMMIT"] = commit
    env["PYTHONUNBUFFERED"] = "1"
    if smoke:
        env.update(TRITON_INTERPRET="1", TORCHDYNAMO_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    else:
        env.pop("TRITON_INTERPRET", None)  # the kernels must run natively
        env.pop("TORCHDYNAMO_DISABLE", None)
    return env


def _let_sigint_through() -> None:
    """In the child before exec: SIGINT at its default and unblocked. An ignored or blocked
    SIGINT is inherited (a parent started in the background, or one whose helper threads
    masked it), and a Python child that inherits either never raises KeyboardInterrupt, so
    pytest would be killed without writing its junit file."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _run_child(command: list[str], budget_s: float, log: Path, env: dict[str, str]) -> tuple[int | None, str]:
    """Run ``command`` in its own process group, appending its output to ``log``.

    Returns (exit code or None on timeout, the output's last lines). At the budget the group
    gets SIGINT (pytest stops and still writes its junit file; a benchmark has saved its rows)
    and, GRACE seconds later, SIGKILL, so pytest's or torch.compile's helpers do not linger.
    """
    with log.open("a") as sink:
        sink.write(f"\n===== {' '.join(map(shlex.quote, command))}\n")
        sink.flush()
        start = log.stat().st_size
        proc = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_let_sigint_through,
        )
        grace = min(GRACE_S, budget_s / 4)
        try:
            code: int | None = proc.wait(timeout=budget_s - grace)
        except subprocess.TimeoutExpired:
            code = None
            for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:  # it ended just now
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            proc.wait()
            sink.write(f"\n===== killed after its budget of {budget_s:.0f} s (SIGINT, then SIGKILL {grace:.0f} s later)\n")
    with log.open() as f:
        f.seek(start)
        tail = f.read()[-3000:]
    return code, tail


def run_stage(name: str, budget_s: float, args: argparse.Namespace, report: dict) -> None:
    """Run one stage and record its status, time, log tail and result in ``report``."""
    out: Path = args.out
    log = out / "suite.log"
    env = _child_env(args.smoke, args.commit)
    env["GPU_SUITE_STAGE_BUDGET"] = f"{budget_s:.0f}"  # a stage that paces itself (the tile sweep) reads it
    if name.startswith("tests_"):
        command = _pytest_command(name, out, args.smoke)
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--out", str(out)]
        command += ["--smoke"] if args.smoke else []
    print(f"[gpu_suite] {name}: budget {budget_s:.0f} s", flush=True)
    began = time.monotonic()
    _fragment(out, name).unlink(missing_ok=True)
    code, tail = _run_child(command, budget_s, log, env)
    seconds = time.monotonic() - began
    if name.startswith("tests_"):
        result = _junit_summary(out / f"junit-{name}.xml")
        # pytest exits 1 when tests fail: the stage ran, the failures are results.
        status = "timeout" if code is None else "ok" if code in (0, 1) and "junit_error" not in result else "failed"
    else:
        try:
            result = json.loads(_fragment(out, name).read_text())
            _fragment(out, name).unlink()
        except (OSError, ValueError):
            result = {}
        status = "timeout" if code is None else "ok" if code == 0 else "failed"
    report["stages"][name] = {
        "status": status, "seconds": round(seconds, 1), "budget_s": round(budget_s), "returncode": code,
        "command": " ".join(map(shlex.quote, command)), "log_tail": tail if status != "ok" else tail[-600:],
        "result": result,
    }
    print(f"[gpu_suite] {name}: {status} in {seconds:.0f} s", flush=True)


def _order(stages: dict) -> dict:
    order = [s for s, _, _ in STAGES]
    return dict(sorted(stages.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _write_report(report: dict, out: Path, png: bool = False) -> None:
    from gpu_suite_report import plot, render_summary  # beside this file; imports `benchmarks`

    if png:
        report["suite"]["png"] = plot(report, out / "results.png")
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "summary.md").write_text(render_summary(report))


def plan_lines(stages: list[str], smoke: bool, scale: float, total: float, plan: str | None) -> list[str]:
    """The plan printed before the first stage: each stage's budget and what they add up to."""
    budgets = [(name, (smoke_s if smoke else gpu_s) * scale) for name, gpu_s, smoke_s in STAGES if name in stages]
    head = f"[gpu_suite] plan {plan or '(custom)'}{' (smoke)' if smoke else ''}: {len(budgets)} stages, " \
           f"budgets {sum(b for _, b in budgets):.0f} s, capped at {total:.0f} s"
    return [head] + [f"[gpu_suite]   {name:16s} {budget:5.0f} s" for name, budget in budgets]


def merge(folders: list[Path], out: Path) -> int:
    """Join the results.json of earlier runs (the two plans' folders) into one report in ``out``;
    a stage present in several comes from the last. The logs and junit files are copied beside it."""
    import shutil

    reports = []
    for folder in folders:
        path = folder / "results.json"
        if not path.is_file():
            print(f"gpu_suite --merge: {path} does not exist; pass the folders the suite wrote", file=sys.stderr)
            return 2
        reports.append(json.loads(path.read_text()))
    out.mkdir(parents=True, exist_ok=True)
    merged: dict = {"suite": {
        "command": " ; ".join(r["suite"]["command"] for r in reports),
        "smoke": any(r["suite"].get("smoke") for r in reports),
        "started": reports[0]["suite"].get("started"),
        "seconds": round(sum(r["suite"].get("seconds", 0) for r in reports), 1),
        "merged_from": [str(f) for f in folders],
    }, "stages": {}}
    for report in reports:
        merged["stages"].update(report["stages"])
    merged["stages"] = _order(merged["stages"])
    for folder in folders:
        for junit in folder.glob("junit-*.xml"):
            if junit.resolve() != (out / junit.name).resolve():
                shutil.copy(junit, out / junit.name)
        if (folder / "suite.log").is_file() and folder.resolve() != out.resolve():
            shutil.copy(folder / "suite.log", out / f"suite-{folder.name}.log")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _write_report(merged, out, png=True)
    from gpu_suite_report import render_targets

    print(render_targets(merged))
    print(f"[gpu_suite] merged {len(folders)} runs into {out}/results.json, summary.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder; on the lent machine a folder under $OUT, one per command")
    parser.add_argument("--plan", choices=sorted(PLANS), default=None,
                        help="one of a lease's two commands: its stages and its total budget ("
                             + "; ".join(f"{k}: {' '.join(v[1])} in {v[0]} s" for k, v in PLANS.items()) + ")")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU under TRITON_INTERPRET=1: checks the plumbing, not the GPU")
    parser.add_argument("--stages", nargs="+", choices=[s for s, _, _ in STAGES], default=None,
                        help="stages to run, in the suite's order (default: the plan's, else all)")
    parser.add_argument("--total-budget", type=float, default=None,
                        help=f"seconds for the whole run (default: the plan's, else {TOTAL_BUDGET_S}); "
                             "each stage gets at most what is left")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every stage's budget (default: %(default)s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the stages an earlier run left in --out and add or replace those run now")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="DIR", default=None,
                        help="run nothing: join the results.json in these folders (the two plans') into --out")
    parser.add_argument("--commit", default=None,
                        help="commit to record when the tree has no .git (a copied working tree); default: git's HEAD")
    parser.add_argument("--stage", choices=sorted(STAGE_FUNCTIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    if args.merge:
        return merge([f.resolve() for f in args.merge], args.out)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.stage:  # a child: run one stage, save its result
        sys.path[:0] = list(map(str, IMPORT_ROOTS))
        _save(args.out, args.stage, STAGE_FUNCTIONS[args.stage](args.out, args.smoke))
        return 0

    plan_total, plan_stages = PLANS[args.plan] if args.plan else (TOTAL_BUDGET_S, [s for s, _, _ in STAGES])
    stages = args.stages or plan_stages
    total = args.total_budget if args.total_budget is not None else plan_total
    print("\n".join(plan_lines(stages, args.smoke, args.budget_scale, total, args.plan)), flush=True)

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device is visible; on a machine without a GPU run `--smoke` instead", file=sys.stderr)
        return 2

    sys.path[:0] = [*map(str, IMPORT_ROOTS), str(Path(__file__).resolve().parent)]
    from gpu_suite_report import render_targets

    report: dict = {
        "suite": {
            "command": " ".join(map(shlex.quote, [sys.executable, *sys.argv])),
            "plan": args.plan,
            "smoke": args.smoke,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "stages": {},
    }
    if args.keep and (args.out / "results.json").exists():
        earlier = json.loads((args.out / "results.json").read_text())
        report["suite"]["earlier_commands"] = earlier["suite"].get("earlier_commands", []) + [earlier["suite"]["command"]]
        report["stages"] = {k: v for k, v in earlier["stages"].items() if k not in stages}
    else:
        (args.out / "suite.log").write_text("")
    began = time.monotonic()
    for name, gpu_s, smoke_s in STAGES:
        if name not in stages:
            continue
        left = total - (time.monotonic() - began)
        budget = min((smoke_s if args.smoke else gpu_s) * args.budget_scale, left)
        if budget < 5:
            report["stages"][name] = {"status": "skipped", "reason": "the run's total budget was spent"}
            continue
        run_stage(name, budget, args, report)
        report["stages"] = _order(report["stages"])
        report["suite"]["seconds"] = round(time.monotonic() - began, 1)
        _write_report(report, args.out)
    _write_report(report, args.out, png=True)
    print(render_targets(report), flush=True)
    print(f"[gpu_suite] wrote {args.out}/results.json, summary.md, suite.log"
          + (", results.png" if report["suite"]["png"] == "results.png" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
