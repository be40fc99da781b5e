"""Pictures of attention: a model's attention probabilities, and each layer kind's mask.

`attention_maps` gathers the data (probabilities from the math path, through
`GPT.forward(..., output_attentions=True)`), `plot_attention` draws them as a grid of
layers x heads with the tokens on both axes. `mask_patterns` / `plot_mask_pattern` need
only a config: they draw which keys each query may see in a dense and in a banded layer,
and the kind of every layer, so GPT-3's alternation is visible at a glance.

Figures are built with `matplotlib.figure.Figure` (no pyplot global state, no display).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt.config import GPTConfig
from minigpt.files import EVAL_AGAIN, writing
from minigpt.model import GPT
from minigpt.ops import band_mask

MAX_PANELS = 64
"""Most layer x head panels one attention figure draws; choose layers and heads beyond it."""
MAX_TICK_LABELS = 48
"""Most token labels drawn per axis; longer prompts label every k-th token."""

_KIND_COLORS = {"dense": "#1f4e8c", "banded": "#e07b39"}


@dataclass
class AttentionMaps:
    """Attention probabilities of chosen layers and heads for one prompt."""

    tokens: list[str]
    """One label per prompt token (see `token_label`)."""
    layers: list[int]
    heads: list[int]
    probs: torch.Tensor
    """(len(layers), len(heads), T, T) float32: row i is query i's distribution over keys."""
    masks: torch.Tensor
    """(len(layers), T, T) bool: where each layer may attend (its causal band)."""
    kinds: list[str]
    """Each chosen layer's kind, e.g. 'dense' or 'banded w=256'."""


def token_label(text: str, max_chars: int = 12) -> str:
    """A token as a tick label: spaces shown as '␣', newlines as '↵', long ones cut."""
    label = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
    return label if len(label) <= max_chars else label[: max_chars - 1] + "…"


def layer_kind(config: GPTConfig, layer: int) -> str:
    window = config.layer_window(layer)
    return "dense" if window is None else f"banded w={window}"


def _check_indices(values: list[int] | None, count: int, what: str) -> list[int]:
    if values is None:
        return list(range(count))
    if not values:
        raise ValueError(f"{what} is empty; give at least one index in 0..{count - 1}")
    bad = [v for v in values if not 0 <= v < count]
    if bad:
        raise ValueError(f"{what} {bad} out of range: this model has {what} 0..{count - 1}")
    return list(values)


@torch.no_grad()
def attention_maps(
    model: GPT, idx: list[int] | torch.Tensor, tokens: list[str],
    layers: list[int] | None = None, heads: list[int] | None = None,
) -> AttentionMaps:
    """Attention probabilities of `layers` x `heads` (default: all) for one prompt `idx` (T ids).

    Raises ValueError for a layer or head index out of range (and whatever `GPT.forward`
    raises for bad ids).
    """
    config = model.config
    layers = _check_indices(layers, config.n_layer, "layers")
    heads = _check_indices(heads, config.n_head, "heads")
    idx = torch.as_tensor(idx, device=model.lm_head.weight.device).reshape(1, -1)  # (1, T)
    if len(tokens) != idx.shape[1]:
        raise ValueError(f"got {len(tokens)} token labels for {idx.shape[1]} token ids")
    attentions = model(idx, output_attentions=True).attentions  # n_layer x (1, H, T, T)
    probs = torch.stack([attentions[layer][0, heads] for layer in layers]).float().cpu()  # (layers, heads, T, T)
    index = torch.arange(idx.shape[1])
    masks = torch.stack([band_mask(index, index, config.layer_window(layer)) for layer in layers])
    return AttentionMaps(tokens, layers, heads, probs, masks, [layer_kind(config, layer) for layer in layers])


def _label_axes(ax, labels: list[str], fontsize: float) -> None:
    step = max(1, -(-len(labels) // MAX_TICK_LABELS))  # ceil: at most MAX_TICK_LABELS per axis
    ticks = list(range(0, len(labels), step))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=fontsize)


def plot_attention(maps: AttentionMaps, path: str | Path, title: str | None = None) -> Path:
    """Save a PNG grid: one panel per (layer, head), keys across, queries down.

    Cells a layer's mask forbids are grey, so the causal band is visible even where the
    model puts little weight. Raises ValueError for more than `MAX_PANELS` panels.
    """
    import numpy as np
    from matplotlib.figure import Figure

    n_rows, n_cols = len(maps.layers), len(maps.heads)
    if n_rows * n_cols > MAX_PANELS:
        raise ValueError(
            f"{n_rows} layers x {n_cols} heads = {n_rows * n_cols} panels is more than {MAX_PANELS}; "
            f"choose fewer with layers=/heads= (--layers 0,1 --heads 0,1)"
        )
    T = len(maps.tokens)
    side = min(7.0, max(2.6, 0.16 * min(T, MAX_TICK_LABELS) + 1.2))  # inches per panel
    fontsize = 7 if T <= 24 else 6
    fig = Figure(figsize=(side * n_cols + 1.0, side * n_rows + 0.6), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)  # (n_rows, n_cols) of Axes
    image = None
    for r, layer in enumerate(maps.layers):
        for c, head in enumerate(maps.heads):
            ax = axes[r, c]
            probs = np.ma.masked_where(~maps.masks[r].numpy(), maps.probs[r, c].numpy())
            image = ax.imshow(probs, cmap=_masked_cmap(), vmin=0.0, vmax=1.0, interpolation="nearest")
            _label_axes(ax, maps.tokens, fontsize)
            ax.set_title(f"layer {layer} ({maps.kinds[r]}), head {head}", fontsize=9)
            if c == 0:
                ax.set_ylabel("query (attends from)", fontsize=8)
            if r == n_rows - 1:
                ax.set_xlabel("key (attends to)", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def mask_patterns(config: GPTConfig, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """One (T, T) bool mask per distinct layer kind, keyed by `layer_kind` names, in layer order."""
    T = config.block_size if seq_len is None else seq_len
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= config.block_size:
        raise ValueError(f"seq_len={seq_len!r} must be an integer in [1, block_size={config.block_size}]")
    index = torch.arange(T)
    out: dict[str, torch.Tensor] = {}
    for layer in range(config.n_layer):
        out.setdefault(layer_kind(config, layer), band_mask(index, index, config.layer_window(layer)))
    return out


def plot_mask_pattern(config: GPTConfig, path: str | Path, seq_len: int | None = None, name: str | None = None) -> Path:
    """Save a PNG: a strip of every layer's kind, then each kind's mask (query down, key across)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    patterns = mask_patterns(config, seq_len)
    T = next(iter(patterns.values())).shape[0]
    n = len(patterns)
    fig = Figure(figsize=(4.2 * n + 0.4, 5.6), layout="constrained")
    grid = fig.add_gridspec(2, n, height_ratios=[1, 9])
    strip_ax = fig.add_subplot(grid[0, :])
    mask_axes = [fig.add_subplot(grid[1, i]) for i in range(n)]

    kinds = [config.layer_kinds[i] for i in range(config.n_layer)]
    colors = ListedColormap([_KIND_COLORS["dense"], _KIND_COLORS["banded"]])
    strip_ax.imshow([[k == "banded" for k in kinds]], cmap=colors, vmin=0, vmax=1, aspect="auto")
    step = max(1, -(-config.n_layer // 24))
    strip_ax.set_xticks(range(0, config.n_layer, step))
    strip_ax.set_yticks([])
    strip_ax.set_xlabel("layer", fontsize=8)
    strip_ax.tick_params(labelsize=7)
    strip_ax.set_title(f"{name or 'config'}: kind of each of the {config.n_layer} layers", fontsize=9)
    present = dict.fromkeys(kinds)
    strip_ax.legend(handles=[Patch(color=_KIND_COLORS[k], label=k) for k in present], fontsize=7,
                    loc="upper left", bbox_to_anchor=(1.0, 1.6), frameon=False)

    for ax, (kind, mask) in zip(mask_axes, patterns.items()):
        color = _KIND_COLORS[kind.split()[0]]
        ax.imshow(mask.numpy(), cmap=ListedColormap(["#eeeeee", color]), vmin=0, vmax=1, interpolation="nearest")
        if kind == "dense":
            rule = "query i sees keys 0..i"
        else:
            rule = f"query i sees keys i-{config.attention_window - 1}..i"
        ax.set_title(f"{kind}: {rule}", fontsize=9)
        ax.set_xlabel("key position j", fontsize=8)
        ax.set_ylabel("query position i", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"attention masks at T={T}", fontsize=10)
    return _save(fig, path)


def _masked_cmap():
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with writing(path, EVAL_AGAIN):
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return path


def save_attention_map(
    model_dir: str, prompt: str, out: str | Path, layers: list[int] | None = None,
    heads: list[int] | None = None, device: str = "cpu",
) -> Path:
    """What ``minigpt attention-map --model`` does: load the model and its tokenizer, plot."""
    from minigpt.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("prompt has no tokens; give at least one character")
    model = GPT.from_pretrained(model_dir).to(device).eval()
    maps = attention_maps(model, ids, [token_label(tokenizer.decode([i])) for i in ids], layers, heads)
    shown = repr(prompt) if len(prompt) <= 60 else repr(prompt[:57]) + "…"  # a title stays on the figure
    return plot_attention(maps, out, title=f"{Path(model_dir).name}: {shown}")


def save_mask_pattern(source: str, out: str | Path, seq_len: int | None = None) -> Path:
    """What ``minigpt attention-map --pattern`` does: the masks of a preset, config file or
    model folder (no weights needed)."""
    from minigpt.report import load_config

    name, config = load_config(source)
    return plot_mask_pattern(config, out, seq_len, name)
