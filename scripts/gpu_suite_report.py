"""The GPU suite's report: summary.md (every figure beside the measured ceilings and the GPU
issue's targets) and results.png, from the dict that scripts/gpu_suite.py builds stage by stage.

Kept apart from the runner so the runner reads as the list of stages it is. Everything here
tolerates missing stages and rows: a run cut short must still render.
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.bench_attention import TABLE_COLUMNS as ATTENTION_COLUMNS
from benchmarks.bench_layer_norm import TABLE_COLUMNS as LAYER_NORM_COLUMNS
from benchmarks.common import markdown_table

TARGET_BANDED_SPEEDUP = 8.0
TARGET_LN_FRAC = {"fwd": 0.80, "bwd": 0.60}
TARGET_MFU = 0.45
TARGET_FWD_PEAK_FRAC = 0.60  # dense causal forward at the longest length, D=128, of the measured bf16 matmul
TRAIN_COLUMNS = [
    "shape", "variant", "backend", "compile", "batch", "seq_len", "ms_per_step", "tokens_per_s",
    "mfu", "mfu_measured_peak", "first_loss", "first_step_s", "peak_cuda_mb", "note",
]
TILE_COLUMNS = ["shape", "mask", "pass", "default", "default_ms", "best", "best_ms", "speedup", "timed"]
TARGET_COLUMNS = ["target", "case", "figure", "goal", "verdict"]


def _rows(report: dict, stage: str) -> list[dict]:
    result = report["stages"].get(stage, {}).get("result") or {}
    return result.get("rows", [])


def _ms(rows: list[dict], **match: object) -> float | None:
    for r in rows:
        if "ms" in r and all(r.get(k) == v for k, v in match.items()):
            return float(r["ms"])
    return None


def _verdict(value: float | None, target: float) -> str:
    if value is None:
        return "no figure"
    return "met" if value >= target else "missed"


def targets(report: dict) -> list[dict]:
    """One row per (target, case): the figure reached, the target and whether it was met."""
    out: list[dict] = []
    attn = _rows(report, "attention")
    for shape in dict.fromkeys(r["shape"] for r in attn):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            ours = _ms(attn, shape=shape, mask="causal", mode=mode, provider="triton")
            sdpa = [m for p in ("sdpa_flash", "sdpa_cudnn")
                    if (m := _ms(attn, shape=shape, mask="causal", mode=mode, provider=p)) is not None]
            ratio = min(sdpa) / ours if ours and sdpa else None
            out.append({"target": "attention dense causal >= SDPA's best (speedup)", "case": f"{shape} {mode}",
                        "figure": ratio, "goal": 1.0, "verdict": _verdict(ratio, 1.0)})
    if attn:
        longest = max(dict.fromkeys(r["shape"] for r in attn), key=lambda s: int(s.split("x")[2]))
        frac = next((r.get("frac_of_matmul_peak") for r in attn if r["shape"] == longest and r["mask"] == "causal"
                     and r["mode"] == "fwd" and r["provider"] == "triton" and "ms" in r), None)
        out.append({"target": "attention dense causal forward, fraction of the measured bf16 matmul peak",
                    "case": f"{longest} fwd", "figure": frac, "goal": TARGET_FWD_PEAK_FRAC,
                    "verdict": _verdict(frac, TARGET_FWD_PEAK_FRAC)})
        for mode in ("fwd", "bwd", "fwd+bwd"):
            banded = _ms(attn, shape=longest, mask="banded", mode=mode, provider="triton")
            dense = _ms(attn, shape=longest, mask="causal", mode=mode, provider="triton")
            flex = _ms(attn, shape=longest, mask="banded", mode=mode, provider="flex")
            ratio = dense / banded if dense and banded else None
            out.append({"target": f"banded w=256 vs our dense causal (>= {TARGET_BANDED_SPEEDUP:.0f}x)",
                        "case": f"{longest} {mode}", "figure": ratio, "goal": TARGET_BANDED_SPEEDUP,
                        "verdict": _verdict(ratio, TARGET_BANDED_SPEEDUP)})
            ratio = flex / banded if flex and banded else None
            out.append({"target": "banded w=256 vs FlexAttention sliding window (speedup)",
                        "case": f"{longest} {mode}", "figure": ratio, "goal": 1.0, "verdict": _verdict(ratio, 1.0)})
    for r in _rows(report, "layer_norm"):
        if r.get("provider") == "triton" and r.get("mode") in TARGET_LN_FRAC:
            goal = TARGET_LN_FRAC[r["mode"]]
            frac = r.get("frac_of_copy_bw")
            out.append({"target": "LayerNorm fraction of copy bandwidth", "case": f"{r['shape']} {r['mode']}",
                        "figure": frac, "goal": goal, "verdict": _verdict(frac, goal)})
    for r in _rows(report, "train"):
        if r.get("variant") == "minigpt" and r.get("mfu") is not None:
            case = f"{r['shape']} {r['backend']} compile={r['compile']}"
            out.append({"target": "training MFU (datasheet peak)", "case": case, "figure": r["mfu"],
                        "goal": TARGET_MFU, "verdict": _verdict(r["mfu"], TARGET_MFU)})
            m = r.get("mfu_measured_peak")
            out.append({"target": "training MFU (measured matmul peak)", "case": case, "figure": m,
                        "goal": TARGET_MFU, "verdict": _verdict(m, TARGET_MFU)})
    return out


def render_targets(report: dict) -> str:
    """The targets table as the suite prints it at the end of a command."""
    return "\n".join(["[gpu_suite] figures against the targets (ratios measured in this run):",
                      markdown_table(targets(report), TARGET_COLUMNS)])


def render_summary(report: dict) -> str:
    """summary.md: stages, environment, ceilings, targets, tests, then every table."""
    stages = report["stages"]
    env = stages.get("environment", {}).get("result") or {}
    ceil = stages.get("ceilings", {}).get("result") or {}
    parts = ["# GPU suite", ""]
    if report["suite"].get("smoke"):
        parts += ["**Smoke run (CPU, TRITON_INTERPRET=1, tiny sizes): the figures below mean nothing.**", ""]
    parts += [
        f"Command: `{report['suite']['command']}`; started {report['suite']['started']}; "
        f"{report['suite'].get('seconds', 0):.0f} s in all.",
        "",
        f"Device: {env.get('device', '?')} (capability {env.get('capability', '-')}, "
        f"{env.get('gpu_memory_gib', '-')} GiB, driver {env.get('driver', '-')}); CUDA {env.get('cuda', '?')}, "
        f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, Python {env.get('python', '?')}; "
        f"commit {env.get('commit', '?')}; matplotlib {env.get('matplotlib', '?')}.",
        "",
        "## Stages",
        "",
        markdown_table([{"stage": k, **v} for k, v in stages.items()], ["stage", "status", "seconds", "budget_s", "reason"]),
        "",
        "## Measured ceilings",
        "",
    ]
    if ceil:
        parts += [f"bf16 matmul ({ceil.get('matmul_size')}^3): {ceil.get('matmul_bf16_tflops', 0):.4g} TFLOP/s; "
                  f"device-to-device copy ({ceil.get('copy_bytes', 0) / 2**20:.0f} MiB): "
                  f"{ceil.get('copy_gbps', 0):.4g} GB/s (read + write). Attention TFLOP/s and training MFU are "
                  "given as fractions of the first, LayerNorm GB/s of the second.", ""]
    else:
        parts += ["not measured (see the ceilings stage)", ""]
    parts += [
        "## The GPU issue's targets",
        "",
        "Each figure is a ratio measured in this run; speedups are the other's time over ours.",
        "",
        markdown_table(targets(report), TARGET_COLUMNS),
        "",
        "## Tests (native, TRITON_INTERPRET unset)",
        "",
    ]
    tests = [{"stage": k, **(v.get("result") or {})} for k, v in stages.items() if k.startswith("tests_")]
    parts += [markdown_table(tests, ["stage", "passed", "failures", "errors", "skipped", "junit"]), ""]
    for t in tests:
        parts += [f"- failed in {t['stage']}: `{name}`" for name in t.get("failed", [])]
    parts += ["", "## Attention", "", markdown_table(_rows(report, "attention"), ATTENTION_COLUMNS), "",
              "## LayerNorm", "", markdown_table(_rows(report, "layer_norm"), LAYER_NORM_COLUMNS), "",
              "## Training (bf16 autocast on CUDA)", "", markdown_table(_rows(report, "train"), TRAIN_COLUMNS), ""]
    tiles = stages.get("attention_tiles", {}).get("result") or {}
    if tiles:
        compiled = tiles.get("compile") or {}
        parts += ["## Attention tile sweep", "",
                  f"{len(tiles.get('rows', []))} of {tiles.get('planned', '?')} planned tiles timed "
                  f"({tiles.get('stopped', 'all of them')}); compiled first by {compiled.get('workers', 0)} processes: "
                  f"{compiled.get('compiled', '-')} of {compiled.get('jobs', '-')} in {compiled.get('seconds', '-')} s. "
                  "Every tile's time is in results.json; per cell, the fastest tile whose output matches the "
                  "launcher's choice:", "",
                  markdown_table(tiles.get("best", []), TILE_COLUMNS), ""]
    for name, stage in stages.items():
        if stage.get("status") not in ("ok", "skipped"):
            parts += [f"## {name}: {stage.get('status')} (exit code {stage.get('returncode')})", "",
                      "```", stage.get("log_tail", "").strip(), "```", ""]
    return "\n".join(parts)


def plot(report: dict, path: Path) -> str:
    """Write results.png (attention TFLOP/s, LayerNorm GB/s, training tokens/s); say why not otherwise."""
    try:
        import matplotlib
    except ImportError:
        return "skipped: matplotlib is not installed"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("attention", "tflops", "attention TFLOP/s", ("shape", "mask", "mode")),
        ("layer_norm", "gbps", "LayerNorm GB/s", ("shape", "mode")),
        ("train", "tokens_per_s", "training tokens/s", ("shape", "compile")),
    ]
    panels = [p for p in panels if _rows(report, p[0])]
    if not panels:
        return "skipped: no benchmark rows"
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 4.5 * len(panels)), squeeze=False)
    for ax, (stage, metric, label, case_keys) in zip(axes[:, 0], panels):
        rows = _rows(report, stage)
        provider_key = "backend" if stage == "train" else "provider"
        cases = list(dict.fromkeys(tuple(str(r.get(k)) for k in case_keys) for r in rows))
        providers = list(dict.fromkeys(f"{r.get('variant', '')} {r[provider_key]}".strip() for r in rows))
        width = 0.8 / max(len(providers), 1)
        for i, provider in enumerate(providers):
            values = {tuple(str(r.get(k)) for k in case_keys): r.get(metric) or 0.0 for r in rows
                      if f"{r.get('variant', '')} {r[provider_key]}".strip() == provider}
            ax.bar([c + i * width for c in range(len(cases))], [values.get(c, 0.0) for c in cases],
                   width=width, label=provider)
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
        ax.set_xticklabels([" ".join(c) for c in cases], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    env = report["stages"].get("environment", {}).get("result") or {}
    fig.suptitle(f"{env.get('device', '?')}; commit {env.get('commit', '?')[:12]}"
                 + (" (smoke: meaningless)" if report["suite"].get("smoke") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
