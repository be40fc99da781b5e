"""The playground's inside view: seconds for `POST /v1/inspect` (one layer's attention per head,
the logit lens at every position, the model card) on this CPU, for texts of 64 and 256 tokens.

    python -m benchmarks.bench_inside --main-job runs/shakespeare --out benchmarks/results

The main job's model (context 64) at 64 tokens, and a GPT-2-shaped model (6 x 384, GPT-2's
vocabulary, random weights: the lens reads 50257 logits per position and layer) at 64 and
256; through `inside_view` in this process and through the server over HTTP; the median of
`--repeats` calls after one warm-up. Never asserts: it reports.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_serve import _gpt2_shaped, _Server  # noqa: E402
from benchmarks.common import environment  # noqa: E402


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure(folder: Path, length: int, threads: int, repeats: int) -> dict:
    import torch

    from minigpt.model import GPT
    from minigpt.serve.inside import inside_view
    from minigpt.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    model, tokenizer = GPT.from_pretrained(folder).eval(), load_tokenizer(folder)
    ids = (tokenizer.encode("ROMEO:\nI will go with thee, and we shall see the end of it. ") * 50)[:length]
    local = _median_seconds(lambda: inside_view(model, tokenizer, ids, layer=1), repeats)
    server = _Server(folder, threads)
    try:
        body = json.dumps({"model": "m", "prompt": ids, "layer": 1}).encode()

        def call():
            request = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/inspect", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                return len(response.read())

        size = call()
        http = _median_seconds(call, repeats)
    finally:
        server.close()
    return {"tokens": length, "inside_view_s": local, "http_s": http, "response_bytes": size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--main-job", type=Path, required=True, help="a trained main-job run (minigpt train)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from minigpt.model_dir import resolve_model_dir
    from minigpt.weights import read_config

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        gpt2 = _gpt2_shaped(Path(tmp) / "gpt2-6x384")
        main_job = resolve_model_dir(args.main_job)
        main_config = read_config(main_job)[1]
        main_name = f"main job ({main_config.n_layer} x {main_config.n_embd}, char, context 64)"
        for name, folder, length in ((main_name, main_job, 64),
                                     ("GPT-2 shape (6 x 384, 50257 vocab)", gpt2, 64),
                                     ("GPT-2 shape (6 x 384, 50257 vocab)", gpt2, 256)):
            row = {"model": name, **measure(folder, length, args.threads, args.repeats)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inside_cpu.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    lines = ["# The playground's inside view on a CPU", "",
             f"torch {env['torch']}, {args.threads} threads, commit {env['commit']}; median of {args.repeats} calls "
             "after a warm-up; layer 1, every head, the logit lens at every position.", "",
             "| model | tokens | `inside_view` (s) | `POST /v1/inspect` over HTTP (s) | response (KB) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['tokens']} | {r['inside_view_s']:.3f} | {r['http_s']:.3f} | "
              f"{r['response_bytes'] / 1024:.0f} |" for r in rows]
    (args.out / "inside_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
