"""`minigpt plot RUN_DIR`: the train and validation loss curves of a run, as a PNG."""
from __future__ import annotations

from pathlib import Path

from minigpt.files import EVAL_AGAIN, writing
from minigpt.train.observe import read_metrics


AXES = ("step", "time")


def _elapsed(records: list[dict]) -> list[float]:
    """Wall seconds of each record since the run began; a resumed run's clock restarts at 0,
    so each restart continues from the last time before it."""
    out, offset, last = [], 0.0, 0.0
    for r in records:
        if "wall_s" not in r:
            raise ValueError("metrics.jsonl has no 'wall_s' (written by older minigpt versions); plot by step instead")
        if r["wall_s"] < last:
            offset += last
        last = r["wall_s"]
        out.append(offset + last)
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None, x: str = "step") -> Path:
    """Draw metrics.jsonl of `run_dir` to `out` (default RUN_DIR/loss.png) against the
    update number (x='step') or the wall-clock seconds of training (x='time'); return its path."""
    if x not in AXES:
        raise ValueError(f"x={x!r} must be one of {AXES}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    position = _elapsed(records) if x == "time" else [r["step"] for r in records]
    train = [(at, r["loss"]) for at, r in zip(position, records) if r["kind"] == "train" and r.get("loss") is not None]
    val = [(at, r["val_loss"]) for at, r in zip(position, records) if r["kind"] == "eval" and "val_loss" in r]
    if not train and not val:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no losses to plot")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train (mean over each log interval)", color="tab:blue", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", color="tab:orange", markersize=4)
        step, loss = val[-1]
        ax.annotate(f"{loss:.3f}", (step, loss), textcoords="offset points", xytext=(-8, 8), ha="right")
    ax.set_xlabel("step" if x == "step" else "wall-clock seconds of training")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(run_dir.resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "loss.png"
    try:
        with writing(out, EVAL_AGAIN):
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out)
    finally:
        plt.close(fig)
    return out
