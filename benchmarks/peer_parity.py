"""How far minigpt's hooks and scores are from TransformerLens's and lm-evaluation-harness's.

The tests in tests/peers assert the bounds (1e-5 per activation, 1e-4 nats per choice);
this prints the measured maxima per hook family and per scoring setting, on the same tiny
random models the tests build, and writes benchmarks/results/peer_parity.md. Needs the
[peers] extra (part of [test]) and ../shared/data's GPT-2 BPE files.

    python -m benchmarks.peer_parity
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

from tests.peers import test_lm_eval as lm_peer
from tests.peers import test_transformer_lens as tl_peer

OUT = Path(__file__).parent / "results" / "peer_parity.md"


def family(name: str) -> str:
    """blocks.3.attn.hook_z -> attn.hook_z; ln1/ln2/ln_final share LayerNorm families."""
    name = re.sub(r"^blocks\.\d+\.", "", name)
    return re.sub(r"^(ln1|ln2|ln_final)\.", "ln*.", name)


def hook_rows() -> list[tuple[str, str, str, float]]:
    rows = []
    for arch, build in tl_peer.PAIRS.items():
        for options in [(), tl_peer.OPTIONS]:
            with tempfile.TemporaryDirectory() as tmp:
                model, peer = build(Path(tmp))
            tl_peer.switch(model, peer, options)
            idx = tl_peer.tokens()
            peer_logits, peer_cache = peer.run_with_cache(idx)
            logits, cache = model.run_with_cache(idx)
            worst: dict[str, float] = {"logits": tl_peer.max_diff(logits, peer_logits)}
            for name in peer_cache:
                f = family(name)
                worst[f] = max(worst.get(f, 0.0), tl_peer.max_diff(cache[name], peer_cache[name]))
            label = "default" if not options else "every option on"
            rows += [(arch, label, f, v) for f, v in worst.items()]
    return rows


def score_rows() -> list[tuple[str, float, int, int, int]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        folder = lm_peer.make_workspace(Path(tmp))
        for shots in (0, 2):
            peer = lm_peer.harness(folder, shots, mp)
            mine = lm_peer.ours(folder, shots, Path(tmp), mp)
            worst = max(abs(a - ll) for t, r in zip(peer, mine)
                        for a, (ll, _) in zip(r["loglikelihoods"], t["filtered_resps"]))
            same = sum(r["acc"] == t["acc"] and r["acc_norm"] == t["acc_norm"] for t, r in zip(peer, mine))
            cut = sum(r["context_tokens"] + max(r["tokens"]) > lm_peer.BLOCK + 1 for r in mine)
            rows.append((f"{shots} shots", worst, same, len(mine), cut))
    return rows


def main() -> None:
    import torch
    import transformer_lens  # noqa: F401
    import lm_eval
    from importlib.metadata import version

    hooks = hook_rows()
    scores = score_rows()
    lines = [f"# Peer parity (torch {torch.__version__}, transformer-lens {version('transformer-lens')}, "
             f"lm-eval {lm_eval.__version__}, float32, CPU)", "",
             "TransformerLens's `HookedTransformer` with no weight processing vs minigpt on one tiny random "
             "GPT-2 and GPT-Neo (2 layers, 4 heads, width 32, LayerNorms perturbed): max abs difference per "
             "hook family over every layer; the tests bound each at 1e-5.", "",
             "| model | options | hook family | max abs diff |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {o} | `{f}` | {v:.1e} |" for a, o, f, v in hooks]
    lines += ["", "lm-evaluation-harness (`simple_evaluate`, `HFLM`) vs `minigpt eval` on a tiny random GPT-2 "
              "with GPT-2's BPE and a 64-token window, 8 items with contexts ending in nothing, a space, a "
              "newline or two spaces; 2 fixed shots (`first_n` / `--fewshot-file`). The tests bound the "
              "log-likelihoods at 1e-4.", "",
              "| setting | max abs diff of a choice's log-likelihood | items with equal acc and acc_norm | "
              "items cut to the window |", "| --- | --- | --- | --- |"]
    lines += [f"| {s} | {w:.1e} | {same} of {n} | {cut} |" for s, w, same, n, cut in scores]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
