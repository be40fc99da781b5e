"""Architecture reports: parameters by component, FLOPs and memory, from a config alone.

`report(source)` is what ``minigpt inspect`` prints: `build_report` gathers the numbers
into a plain dict (the ``--json`` output) and `format_report` lays them out as tables.
Nothing is allocated, so a 175B configuration is as quick as a tiny one. Every count
comes from `minigpt.counts`; this module only arranges and labels them.

(The module is not called ``inspect`` so that it can never shadow the standard library's
``inspect`` when a file in this folder is run as a script.)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minigpt.config import GPTConfig
from minigpt.presets import GPT3_TABLE, PRESETS, PUBLISHED_PARAMS
from minigpt.counts import (
    DTYPE_BYTES,
    activation_bytes_per_token,
    attention_flops_per_token,
    block_param_breakdown,
    flops_per_token,
    kv_cache_bytes,
    param_breakdown,
    params,
    training_state_bytes,
)
from minigpt.files import read_json

GPT3_FAMILY = "gpt3"
"""The source name that reports all eight GPT-3 sizes beside the paper's Table 2.1."""

_BLOCK_LABELS = {
    "ln_1": "block: LayerNorm before attention",
    "attn.q": "block: query projection",
    "attn.k": "block: key projection",
    "attn.v": "block: value projection",
    "attn.proj": "block: attention output projection",
    "ln_2": "block: LayerNorm before MLP",
    "mlp.fc": "block: MLP in (C -> mlp_width)",
    "mlp.proj": "block: MLP out (mlp_width -> C)",
}
# Table 2.1 column -> (label, the GPTConfig value it corresponds to, or None for training settings)
_PAPER_FIELDS = {
    "n_params": ("n_params", params),
    "n_layers": ("n_layers", lambda c: c.n_layer),
    "d_model": ("d_model", lambda c: c.n_embd),
    "n_heads": ("n_heads", lambda c: c.n_head),
    "d_head": ("d_head", lambda c: c.head_dim),
    "batch_tokens": ("batch size (tokens)", None),
    "lr": ("learning rate", None),
}


def load_config(source: str) -> tuple[str, GPTConfig]:
    """(name, config) for a preset name, a config JSON file or a model folder.

    A model folder's config is read with `minigpt.weights.read_config`, so no weights are
    loaded. A JSON file holds GPTConfig fields, or is a Hugging Face ``config.json``.
    Raises ValueError when `source` is none of these.
    """
    if source in PRESETS:
        return source, GPTConfig.from_preset(source)
    path = Path(source)
    if path.is_dir():
        from minigpt.weights import read_config

        return str(path), read_config(path)[1]
    if path.is_file():
        values = read_json(path, "config file")
        if "model_type" in values:  # a Hugging Face config.json: read its folder's way
            from minigpt.weights import read_config

            return str(path), read_config(path.parent)[1]
        try:
            return str(path), GPTConfig.from_dict(values)
        except ValueError as err:
            raise ValueError(f"config file {path}: {err}") from None
    raise ValueError(
        f"{source!r} is neither a preset ({', '.join(PRESETS)}), '{GPT3_FAMILY}' (the GPT-3 paper's "
        f"table), a config JSON file nor a model folder"
    )


def build_report(
    config: GPTConfig, name: str | None = None, seq_len: int | None = None, batch_size: int = 1,
    backend: str = "sdpa",
) -> dict[str, Any]:
    """Every number ``minigpt inspect`` shows, as a JSON-ready dict.

    seq_len (default block_size) sets the context for the attention FLOPs, the activations
    and the KV cache; batch_size scales the activation and KV totals. backend (the model's
    default, 'sdpa') is the attention backend whose work the "computed" FLOPs and the
    backend's activation row follow (see `minigpt.counts.computed_attention_context`).
    Raises ValueError for seq_len outside [1, block_size], batch_size < 1 or an unknown backend.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    T = config.block_size if seq_len is None else seq_len
    attention = attention_flops_per_token(config, T)
    forward = flops_per_token(config, T, training=False)
    total = params(config)
    published = PUBLISHED_PARAMS.get(name) if name is not None else None
    act = activation_bytes_per_token(config, T)
    return {
        "name": name,
        "config": config.to_dict(),
        "layer_kinds": list(config.layer_kinds),
        "params": {
            "components": _components(config),
            "total": total,
            "non_embedding": params(config, non_embedding=True),
            "tied_head": config.tie_embeddings,
            "published": published,
        },
        "paper": _paper_rows(name, config),
        "flops_per_token": {
            "seq_len": T,
            "forward_matmul": forward - attention,
            "forward_attention": attention,
            "forward": forward,
            "training": flops_per_token(config, T, training=True),
            "backend": backend,
            "forward_attention_computed": attention_flops_per_token(config, T, backend),
            "forward_computed": flops_per_token(config, T, training=False, backend=backend),
            "training_computed": flops_per_token(config, T, training=True, backend=backend),
        },
        "memory": {dtype: training_state_bytes(config, dtype) for dtype in DTYPE_BYTES},
        "kv_cache": {
            dtype: {
                "per_token": kv_cache_bytes(config, T, 1, dtype) / T,
                "batch": kv_cache_bytes(config, T, batch_size, dtype),
            }
            for dtype in DTYPE_BYTES
        },
        "activations": {
            "formula": "Korthikanti et al. 2022, sec. 4.1: per layer and token 34*C + 5*H*context bytes "
            "(16-bit activations, 1-byte dropout masks, no recomputation); context = T for dense layers, "
            "min(window, T) for banded ones; embeddings and the LM head excluded",
            "batch_size": batch_size,
            "seq_len": T,
            "per_token": act,
            "per_token_fused_attention": activation_bytes_per_token(config, T, stored_scores=False),
            "backend": backend,
            "per_token_backend": activation_bytes_per_token(config, T, backend=backend),
            "batch": act * batch_size * T,
        },
    }


def gpt3_table() -> list[dict[str, Any]]:
    """The GPT-3 paper's Table 2.1 beside minigpt's eight GPT-3 presets: one dict per size
    with the paper's row, the config's values and the fields that differ."""
    out = []
    for name in GPT3_TABLE:
        rows = _paper_rows(name, GPTConfig.from_preset(name))
        out.append({"name": name, **{key: {k: v for k, v in row.items() if k != "label"} for key, row in rows.items()}})
    return out


def report(
    source: str, seq_len: int | None = None, batch_size: int = 1, as_json: bool = False, backend: str = "sdpa"
) -> str:
    """The text ``minigpt inspect SOURCE`` prints (JSON with `as_json`).

    source: a preset, a config JSON file, a model folder, or 'gpt3' for the GPT-3 paper's
    Table 2.1 beside all eight presets.
    """
    if source == GPT3_FAMILY:
        table = gpt3_table()
        return json.dumps(table, indent=2) if as_json else format_gpt3_table(table)
    name, config = load_config(source)
    data = build_report(config, name, seq_len, batch_size, backend)
    return json.dumps(data, indent=2) if as_json else format_report(data)


# Building blocks ------------------------------------------------------------


def _components(config: GPTConfig) -> list[dict[str, Any]]:
    C, V, M, L = config.n_embd, config.vocab_size, config.mlp_width, config.n_layer

    def linear(n_out: int, n_in: int, bias: bool) -> str:
        return f"{n_out}x{n_in}" + (f" + {n_out}" if bias else "")

    norm = f"{C}" + (f" + {C}" if config.bias else "")
    shapes = {
        "ln_1": norm,
        "attn.q": linear(C, C, config.qkv_bias),
        "attn.k": linear(C, C, config.qkv_bias),
        "attn.v": linear(C, C, config.qkv_bias),
        "attn.proj": linear(C, C, config.bias),
        "ln_2": norm,
        "mlp.fc": linear(M, C, config.bias),
        "mlp.proj": linear(C, M, config.bias),
    }
    parts = param_breakdown(config)
    rows = [
        dict(name="tok_emb", label="token embedding", shape=f"{V}x{C}", each=parts["tok_emb"], layers=1),
        dict(name="pos_emb", label="position embedding", shape=f"{config.block_size}x{C}", each=parts["pos_emb"], layers=1),
    ]
    rows += [
        dict(name=key, label=_BLOCK_LABELS[key], shape=shapes[key], each=count, layers=L)
        for key, count in block_param_breakdown(config).items()
    ]
    rows.append(dict(name="ln_f", label="final LayerNorm", shape=norm, each=parts["ln_f"], layers=1))
    head = "tied to tok_emb" if config.tie_embeddings else f"{V}x{C}"
    rows.append(dict(name="lm_head", label="LM head", shape=head, each=parts["lm_head"], layers=1))
    for row in rows:
        row["total"] = row["each"] * row["layers"]
    return rows


def _paper_rows(name: str | None, config: GPTConfig) -> dict[str, dict[str, Any]] | None:
    """Table 2.1's row for a GPT-3 preset: paper value, config value, and why they differ."""
    if name not in GPT3_TABLE:
        return None
    paper = GPT3_TABLE[name]
    rows = {}
    for key, (label, ours) in _PAPER_FIELDS.items():
        value = None if ours is None else ours(config)
        row: dict[str, Any] = {"label": label, "paper": paper[key], "config": value, "note": None}
        if key == "n_params":
            row["note"] = f"counted {value / paper[key] - 1:+.1%} (the paper rounds)"
        elif value is not None and value != paper[key]:
            printed = paper["n_heads"] * paper["d_head"]
            row["note"] = (
                f"the printed row is inconsistent: n_heads x d_head = {paper['n_heads']} x {paper['d_head']} = "
                f"{printed}, d_model = {paper['d_model']}; minigpt follows d_head"
            )
        rows[key] = row
    return rows


# Text layout ----------------------------------------------------------------


def format_report(data: dict[str, Any]) -> str:
    """The tables of a `build_report` dict, for a terminal."""
    c = data["config"]
    kinds = data["layer_kinds"]
    pattern = " / ".join(c["attention_pattern"])
    window = f", window {c['attention_window']}" if "banded" in kinds else ""
    lines = [
        f"{data['name'] or 'config'}: {c['n_layer']} layers ({pattern} repeating{window}), n_embd {c['n_embd']}, "
        f"{c['n_head']} heads of {c['n_embd'] // c['n_head']}, block_size {c['block_size']}, vocab {c['vocab_size']}",
        "",
    ]
    p = data["params"]
    rows = [["Parameters", "", "shape", "each", "layers", "total", "share"]]
    for r in p["components"]:
        share = f"{r['total'] / p['total']:.1%}" if r["total"] else ""
        rows.append(["  " + r["name"], r["label"], r["shape"], f"{r['each']:,}", str(r["layers"]), f"{r['total']:,}", share])
    rows.append(["  total", "", "", "", "", f"{p['total']:,}", "100.0%"])
    rows.append(["  non-embedding", "(blocks + ln_f + untied head)", "", "", "", f"{p['non_embedding']:,}", ""])
    if p["published"] is not None:
        source = "GPT-3 paper, Table 2.1" if data["paper"] else "published figure"
        rows.append(["  published", source, "", "", "", f"{p['published']:,.0f}",
                     f"{p['total'] / p['published'] - 1:+.1%}"])
    lines += text_table(rows, right={3, 4, 5, 6})

    if data["paper"]:
        rows = [["GPT-3 paper, Table 2.1", "paper", "this config", ""]]
        for row in data["paper"].values():
            ours = "(training setting)" if row["config"] is None else _paper_value(row["config"])
            rows.append(["  " + row["label"], _paper_value(row["paper"]), ours, row["note"] or ""])
        lines += ["", *text_table(rows, right={1, 2})]

    f = data["flops_per_token"]
    rows = [
        [f"FLOPs per token, T={f['seq_len']}", "forward", "training (3x)"],
        ["  matmuls: 2 x (non-embedding params + LM head)", _si(f["forward_matmul"]), _si(3 * f["forward_matmul"])],
        ["  attention: 4 x C x context per layer (banded: window)", _si(f["forward_attention"]), _si(3 * f["forward_attention"])],
        ["  total", _si(f["forward"]), _si(f["training"])],
        [f"  attention as backend={f['backend']} computes it", _si(f["forward_attention_computed"]),
         _si(3 * f["forward_attention_computed"])],
        [f"  total as backend={f['backend']} computes it", _si(f["forward_computed"]), _si(f["training_computed"])],
    ]
    lines += ["", *text_table(rows, right={1, 2})]

    m, kv, act = data["memory"], data["kv_cache"], data["activations"]
    B, T = act["batch_size"], act["seq_len"]
    rows = [["Memory", *m]]
    rows.append(["  weights", *(_bytes(m[d]["weights"]) for d in m)])
    rows.append(["  gradients", *(_bytes(m[d]["gradients"]) for d in m)])
    rows.append(["  AdamW state (m, v)", *(_bytes(m[d]["adamw"]) for d in m)])
    rows.append(["  weights + gradients + AdamW", *(_bytes(sum(m[d].values())) for d in m)])
    rows.append([f"  KV cache per token (mean over T={T}; banded layers hold <= window)",
                 *(_bytes(kv[d]["per_token"]) for d in kv)])
    rows.append([f"  KV cache, batch {B} x {T} tokens", *(_bytes(kv[d]["batch"]) for d in kv)])
    lines += ["", *text_table(rows, right={1, 2})]

    rows = [
        [f"Activations for backward, batch {B} x T={T}", "per token", "batch"],
        ["  attention scores stored (banded: band only)", _bytes(act["per_token"]), _bytes(act["batch"])],
        ["  fused attention (no T x context scores)", _bytes(act["per_token_fused_attention"]),
         _bytes(act["per_token_fused_attention"] * B * T)],
        [f"  backend={act['backend']} ({'stores its scores' if act['backend'] == 'math' else 'fused'})",
         _bytes(act["per_token_backend"]), _bytes(act["per_token_backend"] * B * T)],
    ]
    lines += ["", *text_table(rows, right={1, 2}), f"  ({act['formula']})"]
    return "\n".join(lines)


def format_gpt3_table(table: list[dict[str, Any]]) -> str:
    """Table 2.1 and the presets side by side; `*` marks a config value that differs."""
    keys = list(_PAPER_FIELDS)
    headers = {"batch_tokens": "batch tokens"}
    rows = [["GPT-3 Table 2.1", "n_params", "counted", *(headers.get(k, k) for k in keys[1:])]]
    notes = []
    for entry in table:
        cells = [entry["name"], _paper_value(entry["n_params"]["paper"]), _paper_value(entry["n_params"]["config"])]
        for key in keys[1:]:
            paper, ours = entry[key]["paper"], entry[key]["config"]
            cell = _paper_value(paper)
            if ours is not None and ours != paper:
                cell += f" (ours {ours})*"
                notes.append(f"* {entry['name']} {key}: {entry[key]['note']}")
            cells.append(cell)
        rows.append(cells)
    return "\n".join([*text_table(rows, right=set(range(1, len(rows[0])))), "", *notes])


def text_table(rows: list[list[str]], right: set[int]) -> list[str]:
    """Lines of an aligned table; columns in `right` are right-aligned (numbers)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _paper_value(x: float) -> str:
    """As the paper prints it: 125M, 1.3B, 0.5M tokens, 6.0e-04; small integers as they are."""
    if isinstance(x, float) and x < 1:
        return f"{x:.1e}"
    if x < 1e5:
        return str(int(x))
    return f"{x / 1e9:.4g}B" if x >= 1e9 else f"{x / 1e6:.4g}M"


def _si(x: float, unit: str = "FLOP") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def _bytes(n: float) -> str:
    for factor, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n:.0f} B"
