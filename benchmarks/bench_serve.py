"""`minigpt serve` under load: 16 concurrent streaming clients of 64 new tokens each against the
same 16 requests sent one after another, time to first token, and transformers' `generate` on
the same batch, all in one run on this machine.

    python -m benchmarks.bench_serve --out benchmarks/results                 # both models below
    python -m benchmarks.bench_serve --main-job runs/shakespeare --out /tmp   # a trained main job

The server is a real `minigpt serve` process on 127.0.0.1 (its own torch threads), driven
by the official `openai` client over HTTP, greedy (temperature 0), so every mode produces
the same tokens. Models: the README's main job (trained here by its recipe unless
--main-job points at one) and a GPT-2-shaped model of 6 layers x 384 (GPT-2's vocabulary,
random weights, saved as transformers saves GPT-2), for which transformers' GPT2LMHeadModel
runs `generate` on the same 16 prompts as one left-padded batch. Never asserts: it reports.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment  # noqa: E402
from scripts.checkout import child_env  # noqa: E402

CLIENTS = 16
NEW_TOKENS = 64
PROMPTS = [f"{who}:\n" for who in ("ROMEO", "JULIET", "First Citizen", "MENENIUS", "KING RICHARD III", "QUEEN",
                                   "GLOUCESTER", "HAMLET", "LADY MACBETH", "BRUTUS", "CORIOLANUS", "PETRUCHIO",
                                   "KATHARINA", "PROSPERO", "MIRANDA", "ISABELLA")]


def _train_main_job(out: Path, threads: int) -> Path:
    subprocess.run([sys.executable, "-m", "minigpt", "train", "--out-dir", str(out), "--progress=false",
                    "--sample.tokens=0", f"--threads={threads}"], check=True, env=child_env())
    return out


def _gpt2_shaped(folder: Path) -> Path:
    import torch

    from minigpt import GPT, GPTConfig, Tokenizer
    from minigpt.tokenizer import save_tokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=6, n_head=6, n_embd=384))
    model.save_pretrained(folder)
    save_tokenizer(Tokenizer(), folder, 1024)
    return folder


class _Server:
    def __init__(self, model: Path, threads: int, name: str = "m") -> None:
        import socket
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "minigpt", "serve", "--model", str(model), "--port",
                                      str(self.port), "--max-batch", str(CLIENTS), f"--threads={threads}",
                                      "--model-name", name], env=child_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="-", max_retries=0, timeout=600)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def _one(client, prompt: str) -> dict:
    began = time.perf_counter()
    first, text, tokens = None, "", 0
    for chunk in client.completions.create(model="m", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - began
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft_s": first, "seconds": time.perf_counter() - began, "tokens": tokens, "text": text}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _concurrent(server) -> tuple[list[dict], float]:
    results: list[dict] = [None] * CLIENTS  # type: ignore[list-item]

    def worker(i):
        results[i] = _one(server.client(), PROMPTS[i])

    threads_ = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)]
    began = time.perf_counter()
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    return results, time.perf_counter() - began


def run_server(model: Path, threads: int, repeats: int) -> dict:
    """`repeats` rounds, each the 16 one after another, then the 16 at once; medians over rounds."""
    server = _Server(model, threads)
    rounds = []
    try:
        client = server.client()
        _one(client, PROMPTS[0])  # warm-up: first calls pay for allocations
        for _ in range(repeats):
            began = time.perf_counter()
            sequential = [_one(client, p) for p in PROMPTS]
            seq_wall = time.perf_counter() - began
            results, conc_wall = _concurrent(server)
            rounds.append({"sequential": sum(r["tokens"] for r in sequential) / seq_wall,
                           "concurrent": sum(r["tokens"] for r in results) / conc_wall,
                           "ttft": [r["ttft_s"] for r in results], "ttft_alone": [r["ttft_s"] for r in sequential],
                           "same": all(a["text"] == b["text"] for a, b in zip(sequential, results))})
    finally:
        server.close()
    speedups = [r["concurrent"] / r["sequential"] for r in rounds]
    ttft = [t for r in rounds for t in r["ttft"]]
    return {
        "sequential_tokens_per_s": statistics.median(r["sequential"] for r in rounds),
        "concurrent_tokens_per_s": statistics.median(r["concurrent"] for r in rounds),
        "speedup": statistics.median(speedups), "speedup_min": min(speedups), "speedup_max": max(speedups),
        "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p99_s": _percentile(ttft, 0.99),
        "sequential_ttft_p50_s": _percentile([t for r in rounds for t in r["ttft_alone"]], 0.5),
        "rounds": len(rounds), "same_text_both_ways": all(r["same"] for r in rounds),
    }


def run_engine(model: Path, threads: int) -> float:
    """The same 16 requests at once on `minigpt.serve.engine.Engine` in this process, no HTTP:
    what the decoding loop alone gives (tokens/s), beside what reaches the clients."""
    import torch

    from minigpt.model import GPT
    from minigpt.serve.engine import Engine, Sampling, Sequence
    from minigpt.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    net, tokenizer = GPT.from_pretrained(model).eval(), load_tokenizer(model)
    engine = Engine(net, tokenizer, max_batch=CLIENTS).start()
    try:
        for _ in range(2):  # the first is a warm-up
            done = [threading.Event() for _ in PROMPTS]
            began = time.perf_counter()
            for prompt, event in zip(PROMPTS, done):
                engine.submit(Sequence(tokenizer.encode(prompt), Sampling(max_tokens=NEW_TOKENS, temperature=0),
                                       lambda e, event=event: event.set() if e[0] in ("done", "error") else None))
            for event in done:
                event.wait()
            wall = time.perf_counter() - began
    finally:
        engine.stop(10)
    return CLIENTS * NEW_TOKENS / wall


def run_transformers(model: Path, threads: int) -> dict | None:
    """transformers' generate on the same 16 prompts, one left-padded batch, greedy, 64 new tokens."""
    import torch

    from minigpt.tokenizer import load_tokenizer

    if json.loads((model / "config.json").read_text()).get("model_type") != "gpt2":
        return None
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(threads)
    hf = GPT2LMHeadModel.from_pretrained(model).eval()
    tokenizer = load_tokenizer(model)
    rows = [tokenizer.encode(p) for p in PROMPTS]
    longest = max(map(len, rows))
    ids = torch.tensor([[0] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        hf.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        began = time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, pad_token_id=0)
        wall = time.perf_counter() - began
    return {"tokens_per_s": (out.shape[1] - longest) * len(rows) / wall, "seconds": wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--main-job", type=Path, default=None, help="a trained main-job run (default: train one)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the server")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (one after another, all at once)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        main_job = args.main_job or _train_main_job(Path(tmp) / "shakespeare", args.threads)
        from minigpt.model_dir import resolve_model_dir
        from minigpt.weights import read_config

        main_folder = resolve_model_dir(main_job)
        main_config = read_config(main_folder)[1]
        models = {f"main job (tiny recipe, {main_config.n_layer} x {main_config.n_embd}, char)": main_folder,
                  "GPT-2 shape (6 x 384, 50257 vocab)": _gpt2_shaped(Path(tmp) / "gpt2-6x384")}
        for name, folder in models.items():
            row = {"model": name, **run_server(folder, args.threads, args.repeats),
                   "engine_alone_tokens_per_s": run_engine(folder, args.threads)}
            hf = run_transformers(folder, args.threads)
            row["transformers_generate_tokens_per_s"] = hf["tokens_per_s"] if hf else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    env = environment()
    load = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_cpu.json").write_text(json.dumps({"environment": env, "load_average": load, "rows": rows},
                                                        indent=2) + "\n")
    lines = ["# `minigpt serve` on a CPU: 16 streaming clients x 64 new tokens", "",
             f"{env.get('device', 'cpu')}, torch {env['torch']}, server threads {args.threads}, commit "
             f"{env['commit']}, load average {load[0]:.2f} after the run. Greedy; the official openai client over "
             "HTTP on 127.0.0.1; tokens/s counts completion tokens over the wall time of all 16; medians of "
             f"{args.repeats} rounds (each: the 16 one after another, then all at once), the speedup's range "
             "in brackets; TTFT percentiles over every request of every round.", "",
             "| model | 16 concurrent (tok/s) | 16 one after another (tok/s) | speedup | TTFT p50 / p99 (s) | "
             "TTFT alone p50 (s) | the engine alone, no HTTP (tok/s) | transformers generate, one batch of 16 "
             "(tok/s) | same text |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        hf = f"{r['transformers_generate_tokens_per_s']:.0f}" if r["transformers_generate_tokens_per_s"] else \
            "no equivalent (banded layers, minigpt's layout)"
        lines.append(f"| {r['model']} | {r['concurrent_tokens_per_s']:.0f} | {r['sequential_tokens_per_s']:.0f} | "
                     f"{r['speedup']:.1f}x ({r['speedup_min']:.1f}-{r['speedup_max']:.1f}) | "
                     f"{r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} | "
                     f"{r['sequential_ttft_p50_s']:.3f} | {r['engine_alone_tokens_per_s']:.0f} | {hf} | "
                     f"{r['same_text_both_ways']} |")
    (args.out / "serve_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
