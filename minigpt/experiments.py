"""The standard interpretability experiments, each a short function over `minigpt.hooks`.

- `ablate_heads`: zero or mean ablation of attention heads through `hook_z`;
- `patch_residual`, `patch_heads`: activation patching, clean into corrupted, over
  (layer, position) of `hook_resid_pre` and over (layer, head) of `hook_z`;
- `direct_logit_attribution`: the final residual stream split into embeddings, heads,
  attention biases and MLPs, each read through `ln_final`'s frozen scale onto a logit difference;
- `head_scores`: induction and previous-token scores of every head on repeated random tokens.

`plot_matrix` draws any of the matrices as a PNG heatmap; `patch_report` and `heads_report`
are what `minigpt patch` and `minigpt heads` run.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt.hooks import HookPoint
from minigpt.model import GPT

Metric = Callable[[torch.Tensor], torch.Tensor]
"""logits (B, T, V) -> a scalar tensor, e.g. `logit_diff_metric(answer, wrong)`."""


def logit_diff_metric(answer: int, wrong: int, position: int = -1) -> Metric:
    """logit[answer] - logit[wrong] at `position`, averaged over the batch: the metric of
    Wang et al. 2022 (indirect object identification) and most patching studies."""
    return lambda logits: (logits[:, position, answer] - logits[:, position, wrong]).float().mean()


def _z_replacer(layer_heads: list[int], values: torch.Tensor | None) -> Callable:
    def hook(z: torch.Tensor, point: HookPoint) -> torch.Tensor:  # z: (B, T, H, D)
        z = z.clone()
        z[:, :, layer_heads] = 0.0 if values is None else values[layer_heads].to(z.dtype)
        return z
    return hook


@torch.no_grad()
def ablate_heads(model: GPT, idx: torch.Tensor, heads: list[tuple[int, int]], mode: str = "zero",
                 reference: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, V) with the (layer, head) pairs ablated at every position.

    "zero" sets the head's output z to 0, removing its term from the output projection
    (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"). "mean" replaces it by
    its mean over the batch and positions of `reference` (default `idx`), which keeps the
    head's average contribution and removes only what depends on the input (Wang et al. 2022,
    section 3). Raises ValueError for an unknown mode or a head out of range.
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode={mode!r} must be 'zero' or 'mean'")
    L, H = model.config.n_layer, model.config.n_head
    bad = [(l, h) for l, h in heads if not (0 <= l < L and 0 <= h < H)]
    if bad:
        raise ValueError(f"heads {bad} out of range: layers 0..{L - 1}, heads 0..{H - 1}")
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    means: dict[int, torch.Tensor] = {}
    if mode == "mean":
        names = [f"blocks.{layer}.attn.hook_z" for layer in by_layer]
        _, cache = model.run_with_cache(idx if reference is None else reference, names_filter=names)
        means = {layer: cache[f"blocks.{layer}.attn.hook_z"].mean(dim=(0, 1)) for layer in by_layer}  # (H, D)
    hooks = [(f"blocks.{layer}.attn.hook_z", _z_replacer(hs, means.get(layer))) for layer, hs in by_layer.items()]
    return model.run_with_hooks(idx, fwd_hooks=hooks)


@dataclass
class PatchingResult:
    """A patching matrix with the two baselines it is read against."""

    values: torch.Tensor
    """(rows, cols) the metric of the corrupted run with one activation patched from the clean run."""
    clean: float
    """The metric of the clean run."""
    corrupt: float
    """The metric of the corrupted run."""
    rows: list[str]
    cols: list[str]

    @property
    def normalized(self) -> torch.Tensor:
        """0 where patching did nothing, 1 where it restored the clean metric."""
        return (self.values - self.corrupt) / (self.clean - self.corrupt)


def _check_pair(clean: torch.Tensor, corrupt: torch.Tensor) -> None:
    if clean.shape != corrupt.shape or clean.dim() != 2:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupt {tuple(corrupt.shape)} must be (B, T) token ids "
                         f"of the same shape: patching swaps activations position by position")


@torch.no_grad()
def _patch(model: GPT, clean: torch.Tensor, corrupt: torch.Tensor, metric: Metric, name_of: Callable,
           cells: list[tuple[int, int]], patch: Callable) -> tuple[torch.Tensor, float, float]:
    _check_pair(clean, corrupt)
    names = sorted({name_of(layer) for layer, _ in cells})
    clean_logits, cache = model.run_with_cache(clean, names_filter=names)
    values = []
    for layer, j in cells:
        def hook(act: torch.Tensor, point: HookPoint, layer=layer, j=j) -> torch.Tensor:
            return patch(act.clone(), cache[point.name], j)
        values.append(float(metric(model.run_with_hooks(corrupt, fwd_hooks=[(name_of(layer), hook)]))))
    return torch.tensor(values), float(metric(clean_logits)), float(metric(model(corrupt).logits))


def patch_residual(model: GPT, clean: torch.Tensor, corrupt: torch.Tensor, metric: Metric,
                   labels: list[str] | None = None) -> PatchingResult:
    """Activation patching of the residual stream (Meng et al. 2022, "causal tracing";
    Heimersheim & Nanda 2024): for each layer L and position p, run the corrupted prompt
    with `blocks.L.hook_resid_pre[:, p]` taken from the clean run. Returns (n_layer, T)."""
    L, T = model.config.n_layer, clean.shape[-1]
    cells = [(layer, p) for layer in range(L) for p in range(T)]

    def patch(act, clean_act, p):
        act[:, p] = clean_act[:, p]
        return act

    values, c, k = _patch(model, clean, corrupt, metric, lambda l: f"blocks.{l}.hook_resid_pre", cells, patch)
    return PatchingResult(values.view(L, T), c, k, [f"L{l}" for l in range(L)], labels or [str(p) for p in range(T)])


def patch_heads(model: GPT, clean: torch.Tensor, corrupt: torch.Tensor, metric: Metric) -> PatchingResult:
    """Activation patching over heads (Wang et al. 2022, section 3.1): for each (layer, head),
    run the corrupted prompt with that head's `hook_z` at every position from the clean
    run. Returns (n_layer, n_head)."""
    L, H = model.config.n_layer, model.config.n_head
    cells = [(layer, h) for layer in range(L) for h in range(H)]

    def patch(act, clean_act, h):
        act[:, :, h] = clean_act[:, :, h]
        return act

    values, c, k = _patch(model, clean, corrupt, metric, lambda l: f"blocks.{l}.attn.hook_z", cells, patch)
    return PatchingResult(values.view(L, H), c, k, [f"L{l}" for l in range(L)], [f"H{h}" for h in range(H)])


@dataclass
class Attribution:
    """Direct logit attribution at one position."""

    labels: list[str]
    """One name per component: embed, pos_embed, then per layer its heads, attention bias, MLP."""
    components: torch.Tensor
    """(N, B, C) each component's write to the residual stream; they sum to the final stream."""
    contributions: torch.Tensor
    """(N, B) each component's share of the logit difference."""
    ln_bias: torch.Tensor
    """(B,) ln_final's bias on the logit difference, the one term no component writes."""
    logit_diff: torch.Tensor
    """(B,) the model's logit difference; equals contributions.sum(0) + ln_bias."""


@torch.no_grad()
def direct_logit_attribution(model: GPT, idx: torch.Tensor, answer: int, wrong: int,
                             position: int = -1) -> Attribution:
    """Split the logit difference into what each component writes directly (Elhage et al.
    2021, "A Mathematical Framework for Transformer Circuits": the residual stream is a sum
    of component outputs). Each head's term is hook_z[h] @ its D columns of the output
    projection. The final LayerNorm is made linear by freezing its scale, the per-sample
    std of the final stream, and dividing every component by it after centring; the head
    is then a dot product with W_U[answer] - W_U[wrong]. Needs eval mode (dropout off).
    """
    cfg = model.config
    H, D = cfg.n_head, cfg.head_dim
    names = lambda n: n.endswith(("hook_embed", "hook_pos_embed", "hook_z", "hook_mlp_out"))  # noqa: E731
    _, cache = model.run_with_cache(idx, names_filter=names)
    parts, labels = [cache["hook_embed"], cache["hook_pos_embed"]], ["embed", "pos_embed"]
    for layer, block in enumerate(model.blocks):
        z = cache[f"blocks.{layer}.attn.hook_z"]  # (B, T, H, D)
        w = block.attn.proj.weight.view(cfg.n_embd, H, D)  # (C, H, D): head h reads columns hD..hD+D-1
        parts += list(torch.einsum("bthd,chd->hbtc", z, w))  # H x (B, T, C)
        labels += [f"L{layer}H{h}" for h in range(H)]
        if block.attn.proj.bias is not None:
            parts.append(block.attn.proj.bias.expand_as(parts[-1]))
            labels.append(f"L{layer} attn bias")
        parts.append(cache[f"blocks.{layer}.hook_mlp_out"])
        labels.append(f"L{layer} mlp")
    components = torch.stack([p[:, position] for p in parts]).float()  # (N, B, C)
    ln = model.ln_f
    resid = components.sum(0)  # (B, C): the final residual stream
    scale = (resid.var(dim=-1, unbiased=False, keepdim=True) + ln.eps).sqrt()  # (B, 1), frozen
    direction = (model.lm_head.weight[answer] - model.lm_head.weight[wrong]).float()  # (C,)
    centred = components - components.mean(dim=-1, keepdim=True)
    contributions = (centred / scale * ln.weight.float()) @ direction  # (N, B)
    ln_bias = (ln.bias.float() @ direction).expand(resid.shape[0]) if ln.bias is not None else torch.zeros(resid.shape[0])
    logits = model(idx).logits[:, position].float()
    return Attribution(labels, components, contributions, ln_bias, logits[:, answer] - logits[:, wrong])


@dataclass
class HeadScores:
    """Per-head attention scores on a repeated random sequence."""

    induction: torch.Tensor
    """(n_layer, n_head) mean attention from each token of the second copy to the token
    after the same token's first occurrence."""
    previous: torch.Tensor
    """(n_layer, n_head) mean attention from each token to the one before it."""
    half: int
    """Length of each copy."""


@torch.no_grad()
def head_scores(model: GPT, half: int | None = None, batch: int = 8, seed: int = 0) -> HeadScores:
    """Induction and previous-token scores (Olsson et al. 2022, "In-context Learning and
    Induction Heads", section 2): on random tokens repeated twice, an induction head at
    position i of the second copy attends to i - half + 1, the token that followed the
    current token last time; a previous-token head attends to i - 1. Scores are mean
    attention probabilities, so 1 is a perfect head and ~1/i is a uniform one.
    """
    cfg = model.config
    half = min(cfg.block_size // 2, 50) if half is None else half
    if not 2 <= half <= cfg.block_size // 2:
        raise ValueError(f"half={half} must be in 2..{cfg.block_size // 2} (two copies fit block_size={cfg.block_size})")
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, cfg.vocab_size, (batch, half), generator=g)
    idx = torch.cat([first, first], dim=1).to(model.lm_head.weight.device)  # (B, 2*half)
    _, cache = model.run_with_cache(idx, names_filter=lambda n: n.endswith("hook_pattern"))
    q = torch.arange(half, 2 * half)  # queries of the second copy
    induction, previous = [], []
    for layer in range(cfg.n_layer):
        p = cache[f"blocks.{layer}.attn.hook_pattern"].float()  # (B, H, 2*half, 2*half)
        induction.append(p[:, :, q, q - half + 1].mean(dim=(0, 2)))  # (H,)
        previous.append(p.diagonal(-1, dim1=-2, dim2=-1).mean(dim=(0, 2)))  # query i -> key i - 1
    return HeadScores(torch.stack(induction).cpu(), torch.stack(previous).cpu(), half)


def plot_matrix(panels: list[tuple[str, torch.Tensor, list[str], list[str]]], path: str | Path,
                title: str | None = None, diverging: bool = False, xlabel: str = "", ylabel: str = "layer") -> Path:
    """Save heatmaps side by side, one per (title, (rows, cols) matrix, row labels, col labels),
    values written in cells of small matrices. `diverging` centres a red/blue map on 0."""
    from matplotlib.figure import Figure

    from minigpt.attention_map import _save

    widths = [max(3.0, 0.32 * m.shape[1] + 1.6) for _, m, _, _ in panels]
    height = max(2.6, 0.36 * max(m.shape[0] for _, m, _, _ in panels) + 1.6)
    fig = Figure(figsize=(sum(widths) + 0.8 * len(panels), height), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=widths)[0]
    for ax, (name, matrix, rows, cols) in zip(axes, panels):
        m = matrix.float().numpy()
        if diverging:
            lim = max(float(abs(m).max()), 1e-6)
            image = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        else:
            image = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=max(1.0, float(m.max())), aspect="auto",
                              interpolation="nearest")
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        step = max(1, -(-len(cols) // 48))
        ax.set_xticks(range(0, len(cols), step), cols[::step], fontsize=7, rotation=90 if len(cols) > 12 else 0)
        if m.size <= 160:
            for (r, c), v in zip(((r, c) for r in range(m.shape[0]) for c in range(m.shape[1])), m.flat):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="black" if diverging else "white")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        fig.colorbar(image, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def heads_report(model_dir: str, out: str | Path, half: int | None = None, device: str = "cpu") -> str:
    """What ``minigpt heads`` does: induction and previous-token scores per head, a PNG, a summary."""
    model = GPT.from_pretrained(model_dir).to(device).eval()
    s = head_scores(model, half)
    L, H = s.induction.shape
    rows, cols = [f"L{l}" for l in range(L)], [f"H{h}" for h in range(H)]
    path = plot_matrix([(f"induction score (copies of {s.half} random tokens)", s.induction, rows, cols),
                        ("previous-token score", s.previous, rows, cols)], out, title=Path(model_dir).name,
                       xlabel="head")
    lines = [f"wrote {path}"]
    for name, m in (("induction", s.induction), ("previous-token", s.previous)):
        top = m.flatten().topk(min(3, m.numel()))
        best = ", ".join(f"L{int(i) // H}H{int(i) % H} {float(v):.2f}" for v, i in zip(top.values, top.indices))
        lines.append(f"top {name} heads: {best}")
    return "\n".join(lines)


def _single_token(tokenizer, text: str, what: str) -> int:
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise ValueError(f"{what} {text!r} is {len(ids)} tokens {[tokenizer.decode([i]) for i in ids]}; "
                         f"give text that is exactly one token (GPT-2 BPE words usually start with a space)")
    return ids[0]


def patch_report(model_dir: str, clean: str, corrupt: str, answer: str, wrong: str, out: str | Path,
                 device: str = "cpu") -> str:
    """What ``minigpt patch`` does: patch the clean prompt's residual stream and heads into the
    corrupted one, scored by logit(answer) - logit(wrong); one PNG with both matrices."""
    from minigpt.attention_map import token_label
    from minigpt.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = GPT.from_pretrained(model_dir).to(device).eval()
    a, b = tokenizer.encode(clean), tokenizer.encode(corrupt)
    if len(a) != len(b) or not a:
        raise ValueError(f"clean ({len(a)} tokens) and corrupt ({len(b)} tokens) must have the same, non-zero "
                         f"number of tokens: {[tokenizer.decode([i]) for i in a]} vs {[tokenizer.decode([i]) for i in b]}")
    metric = logit_diff_metric(_single_token(tokenizer, answer, "--answer"), _single_token(tokenizer, wrong, "--wrong"))
    x, y = torch.tensor([a], device=device), torch.tensor([b], device=device)
    labels = [token_label(tokenizer.decode([i])) for i in a]
    resid = patch_residual(model, x, y, metric, labels)
    heads = patch_heads(model, x, y, metric)
    path = plot_matrix([("hook_resid_pre, by layer and position", resid.normalized, resid.rows, resid.cols),
                        ("hook_z, by layer and head", heads.normalized, heads.rows, heads.cols)], out,
                       title=f"{Path(model_dir).name}: logit({answer!r}) - logit({wrong!r}), "
                             f"0 = corrupt ({resid.corrupt:.2f}), 1 = clean ({resid.clean:.2f})", diverging=True,
                       xlabel="position / head")
    return f"wrote {path}\nlogit difference: clean {resid.clean:.3f}, corrupt {resid.corrupt:.3f}"
