"""`minigpt plot RUN_DIR`: the train and validation loss curves of a run, as a PNG."""
from __future__ import annotations

from pathlib import Path

from minigpt.train.observe import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw metrics.jsonl of `run_dir` to `out` (default RUN_DIR/loss.png); return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train" and r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval" and "val_loss" in r]
    if not train and not val:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no losses to plot")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train (mean over each log interval)", color="tab:blue", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", color="tab:orange", markersize=4)
        step, loss = val[-1]
        ax.annotate(f"{loss:.3f}", (step, loss), textcoords="offset points", xytext=(-8, 8), ha="right")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(run_dir.resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
