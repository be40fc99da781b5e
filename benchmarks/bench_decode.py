"""Decoding on a CPU, side by side: minigpt against transformers and llama.cpp on the same weights.

Issue 31's rows: greedy decoding, batch 1, 64 new tokens after a 32-token prompt, on GPT-2's
architecture at two shapes (6 layers x 384, "small", and GPT-2 124M), with float32 and with
bfloat16 weights, at 2 threads and at 1; and the aggregate tokens/s of batches of 4 and 16.

- **Weights.** A random GPT-2 is saved once by transformers, with GPT-2's tokenizer files
  (from ../shared/data/gpt2_bpe) so that llama.cpp's own converter can read the folder; every
  library loads that folder.
- **Roofline.** A decoded token reads every block matrix and the LM head once (and one row of
  each embedding), so at the machine's streaming bandwidth B tokens/s cannot exceed
  B / (those bytes). B is measured in the same run: a sum over 512 MB with all threads,
  median of 7.
- **llama.cpp** is measured where `--llama-python` names an interpreter with
  llama-cpp-python, and `--llama-convert` llama.cpp's `convert_hf_to_gguf.py` (from the same
  release; the benchmark installs nothing). Its Python API decodes greedily (top_k=1) and is
  timed from the first new token's request to the 64th, as minigpt's `generate` is.
  Without them its rows are skipped, with a note.
- **Timing.** Every measurement runs in a fresh interpreter (its own memory and threads);
  the libraries alternate for --rounds rounds so that the VM's drift hits all of them; each
  child times --repeats calls after a warm-up and reports the median; the table gives the
  median over rounds.
- **Tokens.** Greedy tokens are compared between the libraries (float32), and bfloat16's
  with float32's over --agreement-prompts prompts of real text, on this random model and on
  a model trained on tiny Shakespeare (`--trained`, a run folder, e.g. the main job's).
- **Where the time goes.** `--breakdown` profiles minigpt's float32 decoding per token:
  the matrix products by layer part (attention, MLP, head), attention's own work, LayerNorm,
  sampling, other operators; minigpt's C calls (a block for one token, the head's product),
  which torch's profiler cannot see, are timed by wrapping them; Python and dispatch are the
  wall time none of these accounts for.
  `--breakdown-before <checkout>` profiles another checkout of minigpt the same way.

    python benchmarks/bench_decode.py --llama-python /path/to/venv/bin/python \\
        --llama-convert /path/to/llama.cpp/convert_hf_to_gguf.py --trained runs/shakespeare

Writes benchmarks/results/decode_cpu.json and .md. Never asserts (benchmarks report).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"small": dict(n_layer=6, n_head=6, n_embd=384), "124m": dict(n_layer=12, n_head=12, n_embd=768)}
VOCAB = 50257
PROMPT_LEN, NEW_TOKENS = 32, 64
BATCHES = (4, 16)
GPT2_BPE = REPO.parent / "shared" / "data" / "gpt2_bpe"
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
DTYPES = ("float32", "bfloat16")


# ---- children: each runs in its own interpreter --------------------------------------------

def _import_minigpt():
    sys.path.insert(0, os.environ.get("MINIGPT_SRC", str(REPO)))
    import minigpt

    return minigpt


def _prompts(folder: str | Path, batch: int) -> list[list[int]]:
    """The first `batch` of the prompts `_save` drew (random ids, the same for every library)."""
    return json.loads((Path(folder) / "prompts.json").read_text())[:batch]


def _save(shape: str, folder: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(**SHAPES[shape], n_ctx=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    # GPT-2's own files under the names transformers reads (its constructor given the paths
    # builds an empty vocabulary in transformers 5), then its tokenizer.json beside them.
    shutil.copy(GPT2_BPE / "encoder.json", folder / "vocab.json")
    shutil.copy(GPT2_BPE / "vocab.bpe", folder / "merges.txt")
    transformers.GPT2TokenizerFast.from_pretrained(folder).save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (PROMPT_LEN,), generator=g).tolist() for _ in range(max(BATCHES))]
    (folder / "prompts.json").write_text(json.dumps(prompts))


def _child_torch(library: str, folder: str, dtype: str, batch: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    prompts = _prompts(folder, batch)
    if library == "minigpt":
        minigpt = _import_minigpt()
        from minigpt import model_dir

        if hasattr(model_dir, "load_for_decoding"):  # what `sample` and `serve` load (bfloat16 packed for oneDNN)
            model = model_dir.load_for_decoding(folder, dtype=dtype).eval()
        else:  # a checkout from before it (--breakdown-before)
            model = minigpt.GPT.from_pretrained(folder).eval().to(torch_dtype)

        def run(new: int):
            return model.generate(prompts, new, temperature=0)
    else:
        import transformers

        model = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch_dtype).eval()
        ids = torch.tensor(prompts)

        def run(new: int):
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, use_cache=True, pad_token_id=0)
            return out[:, PROMPT_LEN:].tolist()
    return _time_calls(run, repeats, batch)


def _time_calls(run, repeats: int, batch: int) -> dict:
    """Median seconds of `run(NEW_TOKENS)` over `repeats` calls after a short warm-up call,
    the aggregate tokens/s, and the last call's tokens (one list per row)."""
    run(4)
    times, out = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        out = run(NEW_TOKENS)
        times.append(time.perf_counter() - began)
    seconds = statistics.median(times)
    return {"seconds": seconds, "tokens_per_s": batch * NEW_TOKENS / seconds, "tokens": out}


def _child_llama(gguf: str, folder: str, repeats: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=PROMPT_LEN + NEW_TOKENS + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=PROMPT_LEN, verbose=False)
    prompt = _prompts(folder, 1)[0]

    def run(new: int) -> list[list[int]]:
        llm.reset()
        out = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) == new:
                break
        return [out]
    return _time_calls(run, repeats, 1)


def _child_bandwidth(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    data = torch.rand(128 * 2**20)  # 512 MB of float32, written, so every page is real
    times = []
    for _ in range(8):
        began = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - began)
    return {"gb_per_s": data.numel() * 4 / statistics.median(times[1:]) / 1e9}


def _child_agreement(folder: str, count: int, threads: int) -> dict:
    """Greedy tokens of the bfloat16 model against the float32 one over `count` prompts of
    real text (32 tokens each, from tiny Shakespeare's validation tenth)."""
    import torch

    torch.set_num_threads(threads)
    minigpt = _import_minigpt()
    from minigpt.model_dir import resolve_model_dir
    from minigpt.tokenizer import load_tokenizer

    folder = resolve_model_dir(folder)  # a run folder too (its best checkpoint)
    model = minigpt.GPT.from_pretrained(folder).eval()
    half = minigpt.GPT.from_pretrained(folder).eval().to(torch.bfloat16)

    os.environ.setdefault("MINIGPT_GPT2_BPE_DIR", str(GPT2_BPE))  # no network: GPT-2's own files
    tokenizer = load_tokenizer(folder)
    text = SHAKESPEARE.read_text()
    text = text[int(len(text) * 0.9):]
    ids = tokenizer.encode(text)
    step = max(1, (len(ids) - PROMPT_LEN) // count)
    prompts = [ids[i * step:i * step + PROMPT_LEN] for i in range(count)]
    same, first_diff = 0, []
    for prompt in prompts:
        a = model.generate([prompt], NEW_TOKENS, temperature=0)[0]
        b = half.generate([prompt], NEW_TOKENS, temperature=0)[0]
        same += a == b
        if a != b:
            first_diff.append(next(i for i, (x, y) in enumerate(zip(a, b)) if x != y))
    return {"prompts": count, "identical": same, "first_difference_at": sorted(first_diff)}


def _child_breakdown(folder: str, threads: int) -> dict:
    """Per decoded token (batch 1, float32): milliseconds by part, and the unprofiled wall time.

    torch's profiler sees torch's operators; it cannot see minigpt's C calls (`cpu_decode`:
    a block for one token, the head's matrix-vector product), which are timed instead by
    wrapping them in a run of their own. Python and dispatch are what neither accounts for.
    The 32-token prompt's forward (through torch) is counted in the per-token figures, as
    in the speed rows."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    minigpt = _import_minigpt()
    model = minigpt.GPT.from_pretrained(folder).eval()
    C, V = model.config.n_embd, model.config.vocab_size
    prompt = _prompts(folder, 1)
    model.generate(prompt, 4, temperature=0)
    walls = []
    for _ in range(5):
        began = time.perf_counter()
        model.generate(prompt, NEW_TOKENS, temperature=0)
        walls.append(time.perf_counter() - began)
    parts: dict[str, float] = {}
    kernels = _time_c_calls(model, prompt)  # {} for a checkout without them
    for part, ms in kernels.items():
        parts[part] = ms
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model.generate(prompt, NEW_TOKENS, temperature=0)
    products = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::bmm", "aten::mv")
    for event in prof.key_averages(group_by_input_shape=True):
        dims = {d for shape in (event.input_shapes or []) for d in (shape or [])}
        if event.key in products:
            part = "head" if V in dims else "MLP products" if 4 * C in dims else "attention products"
            if kernels:  # with the C block, torch's products are the prompt's
                part = "the prompt's products (through torch)"
        elif "attention" in event.key or event.key in ("aten::index_put_", "aten::copy_", "aten::arange", "aten::cat"):
            part = "attention (scores, KV cache)"
        elif "layer_norm" in event.key:
            part = "LayerNorm"
        elif event.key == "aten::gelu":
            part = "MLP (GELU)"
        elif event.key in ("aten::argmax", "aten::softmax", "aten::multinomial", "aten::topk", "aten::sort"):
            part = "sampling"
        else:
            part = "other operators"
        parts[part] = parts.get(part, 0.0) + event.self_cpu_time_total / 1e3  # ms
    wall_ms = statistics.median(walls) * 1e3
    per_token = {k: v / NEW_TOKENS for k, v in parts.items()}
    per_token["Python and dispatch"] = max(0.0, wall_ms / NEW_TOKENS - sum(per_token.values()))
    return {"wall_ms_per_token": wall_ms / NEW_TOKENS, "ms_per_token": per_token}


def _time_c_calls(model, prompt) -> dict[str, float]:
    """Milliseconds in minigpt's C calls over one `generate`: the blocks computed in one call
    each, and the one-row products (the head's, and the blocks' where they are not in a C
    block); {} where the checkout has no C kernels (`cpu_decode`, before it `cpu_gemv`)."""
    try:
        from minigpt import cpu_decode as kernels
    except ImportError:
        try:
            from minigpt import cpu_gemv as kernels
        except ImportError:
            return {}
    block = "blocks, one C call each (products, attention, LayerNorm, GELU)"
    spent = {block: 0.0, "head": 0.0, "block products (C, one row)": 0.0}
    vocab = model.config.vocab_size
    plan = getattr(kernels, "BlockPlan", None)
    step, gemv = getattr(plan, "step", None), kernels.gemv

    def timed(fn, part_of):
        def call(*args, **kwargs):
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part_of(*args)] += (time.perf_counter() - began) * 1e3
        return call

    if plan is not None:
        plan.step = timed(step, lambda *args: block)
    kernels.gemv = timed(gemv, lambda x, weight, *rest: "head" if weight.shape[0] == vocab else
                         "block products (C, one row)")
    try:
        model.generate(prompt, NEW_TOKENS, temperature=0)
    finally:
        kernels.gemv = gemv
        if plan is not None:
            plan.step = step
    return {part: ms for part, ms in spent.items() if ms}


# ---- the parent: never imports torch --------------------------------------------------------

def _run(*args: str, python: str = sys.executable, env: dict | None = None) -> dict:
    proc = subprocess.run([python, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _weight_bytes(shape: str, dtype: str) -> int:
    C, L = SHAPES[shape]["n_embd"], SHAPES[shape]["n_layer"]
    per_value = 4 if dtype == "float32" else 2
    return (L * 12 * C * C + VOCAB * C) * per_value


def _convert(convert: str, folder: Path, dtype: str, out: Path) -> Path:
    gguf = out / f"{folder.name}-{dtype}.gguf"
    outtype = "f32" if dtype == "float32" else "bf16"
    vendor = Path(convert).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(vendor / "gguf-py"), str(vendor)]))
    proc = subprocess.run([sys.executable, convert, str(folder), "--outtype", outtype, "--outfile", str(gguf)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed:\n{proc.stderr[-3000:]}")
    return gguf


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "save":
            _save(rest[0], Path(rest[1]))
            print("{}")
        elif kind == "torch":
            print(json.dumps(_child_torch(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]), int(rest[5]))))
        elif kind == "llama":
            print(json.dumps(_child_llama(rest[0], rest[1], int(rest[2]), int(rest[3]))))
        elif kind == "bandwidth":
            print(json.dumps(_child_bandwidth(int(rest[0]))))
        elif kind == "agreement":
            print(json.dumps(_child_agreement(rest[0], int(rest[1]), int(rest[2]))))
        elif kind == "breakdown":
            print(json.dumps(_child_breakdown(rest[0], int(rest[1]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--shapes", default="small,124m")
    parser.add_argument("--llama-python", default=None, help="an interpreter with llama-cpp-python")
    parser.add_argument("--llama-convert", default=None, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--agreement-prompts", type=int, default=100)
    parser.add_argument("--trained", default=None, help="a trained model folder for the bfloat16 agreement too")
    parser.add_argument("--breakdown", action="store_true", help="profile minigpt's decoding per token")
    parser.add_argument("--only-breakdown", action="store_true",
                        help="profile only (no speed rows, no agreement), into decode_breakdown_cpu.json/.md")
    parser.add_argument("--breakdown-before", default=None,
                        help="another checkout of minigpt whose decoding is profiled too (the 'before' column)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # this checkout's minigpt names the CPU, whichever MINIGPT_SRC the children time
    from minigpt.device import describe_cpu  # not at the top: the children measure their own imports

    threads = [int(t) for t in args.threads.split(",")]
    llama = bool(args.llama_python and args.llama_convert)
    notes = [] if llama else ["llama.cpp: not measured (give --llama-python and --llama-convert)"]

    rows, extra = [], {}
    bandwidth = statistics.median(_run("--child", "bandwidth", str(max(threads)))["gb_per_s"] for _ in range(3))
    meta = {"machine": describe_cpu(),
            "bandwidth_gb_per_s": round(bandwidth, 1), "date": time.strftime("%Y-%m-%d"),
            "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
            "rounds": args.rounds, "repeats": args.repeats, "notes": notes, "versions": _versions(args)}
    args.out.mkdir(parents=True, exist_ok=True)

    name = "decode_breakdown_cpu" if args.only_breakdown else "decode_cpu"
    args.breakdown |= args.only_breakdown

    def save() -> None:
        """Write what has been measured so far (a late failure keeps the rows before it)."""
        (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows, **extra}, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(_markdown(meta, rows, extra, llama))

    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            folder = Path(tmp) / shape
            _run("--child", "save", shape, str(folder))
            ggufs = {dt: _convert(args.llama_convert, folder, dt, Path(tmp)) for dt in DTYPES} if llama else {}
            if args.breakdown:
                extra[f"breakdown_{shape}"] = _run("--child", "breakdown", str(folder), str(max(threads)))
                if args.breakdown_before:
                    extra[f"breakdown_{shape}_before"] = _run(
                        "--child", "breakdown", str(folder), str(max(threads)),
                        env=dict(os.environ, MINIGPT_SRC=str(Path(args.breakdown_before).resolve())))
                    extra[f"breakdown_{shape}_before"]["checkout"] = subprocess.run(
                        ["git", "-C", args.breakdown_before, "rev-parse", "--short", "HEAD"], capture_output=True,
                        text=True).stdout.strip() or "unknown"
                save()
            if args.only_breakdown:
                continue
            for n in threads:
                for dtype in DTYPES:
                    contenders = ["minigpt", "transformers"] + (["llama.cpp"] if llama else [])
                    rounds = []
                    for _ in range(args.rounds):
                        done = {}
                        for lib in contenders:
                            if lib == "llama.cpp":
                                done[lib] = _run("--child", "llama", str(ggufs[dtype]), str(folder), str(args.repeats), str(n),
                                                 python=args.llama_python)
                            else:
                                done[lib] = _run("--child", "torch", lib, str(folder), dtype, "1", str(args.repeats),
                                                 str(n))
                        rounds.append(done)
                    roof = bandwidth * 1e9 / _weight_bytes(shape, dtype)
                    row = {"shape": shape, "dtype": dtype, "threads": n, "batch": 1, "roofline_tokens_per_s": round(roof, 1)}
                    for lib in contenders:
                        speed = statistics.median(r[lib]["tokens_per_s"] for r in rounds)
                        row[lib] = round(speed, 1)
                        row[f"{lib}_roofline_pct"] = round(100 * speed / roof, 1)
                        row[f"{lib}_per_round"] = [round(r[lib]["tokens_per_s"], 1) for r in rounds]
                    for lib in contenders[1:]:
                        row[f"vs_{lib}"] = round(statistics.median(
                            r["minigpt"]["tokens_per_s"] / r[lib]["tokens_per_s"] for r in rounds), 2)
                        row[f"same_tokens_as_{lib}"] = all(r["minigpt"]["tokens"] == r[lib]["tokens"] for r in rounds)
                    rows.append(row)
                    save()
                    print(json.dumps(row), flush=True)
            for batch in BATCHES:
                n = max(threads)
                rounds = [{lib: _run("--child", "torch", lib, str(folder), "float32", str(batch), str(args.repeats),
                                     str(n)) for lib in ("minigpt", "transformers")} for _ in range(args.rounds)]
                row = {"shape": shape, "dtype": "float32", "threads": n, "batch": batch}
                for lib in ("minigpt", "transformers"):
                    row[lib] = round(statistics.median(r[lib]["tokens_per_s"] for r in rounds), 1)
                row["vs_transformers"] = round(statistics.median(
                    r["minigpt"]["tokens_per_s"] / r["transformers"]["tokens_per_s"] for r in rounds), 2)
                row["same_tokens_as_transformers"] = all(r["minigpt"]["tokens"] == r["transformers"]["tokens"]
                                                         for r in rounds)
                rows.append(row)
                save()
                print(json.dumps(row), flush=True)
            extra[f"agreement_random_{shape}"] = _run("--child", "agreement", str(folder),
                                                      str(args.agreement_prompts), str(max(threads)))
            save()
        if args.trained and not args.only_breakdown:
            extra["agreement_trained"] = _run("--child", "agreement", args.trained, str(args.agreement_prompts),
                                              str(max(threads)))
            extra["agreement_trained"]["model"] = f"the trained model {Path(args.trained).name}"
            save()
    print((args.out / f"{name}.md").read_text())


def _versions(args) -> dict:
    from importlib.metadata import version

    out = {"torch": version("torch"), "transformers": version("transformers")}
    if args.llama_python:
        proc = subprocess.run([args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                              capture_output=True, text=True)
        out["llama_cpp_python"] = proc.stdout.strip() or "unknown"
    return out


def _markdown(meta: dict, rows: list[dict], extra: dict, llama: bool) -> str:
    v = meta["versions"]
    lines = [
        f"# Decoding on a CPU: minigpt vs transformers{' and llama.cpp' if llama else ''} ({meta['date']}, "
        f"commit {meta['commit']})",
        "",
        f"{meta['machine']}; torch {v['torch']}, transformers {v['transformers']}"
        + (f", llama-cpp-python {v.get('llama_cpp_python')}" if llama else "")
        + f". Greedy, {NEW_TOKENS} new tokens after {PROMPT_LEN}, random GPT-2 weights saved once by transformers. "
        f"{meta['rounds']} rounds alternating the libraries, each a fresh process timing {meta['repeats']} calls after "
        f"a warm-up; medians. Roofline: the streaming bandwidth measured in this run "
        f"({meta['bandwidth_gb_per_s']} GB/s, a 512 MB sum on all threads) over the bytes a token reads (block "
        f"matrices and LM head). `python benchmarks/bench_decode.py` (see its docstring).",
        "",
        "| shape | dtype | threads | batch | minigpt tok/s | % of roofline | transformers tok/s | minigpt / transformers |"
        + (" llama.cpp tok/s | minigpt / llama.cpp |" if llama else "") + " same greedy tokens |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if llama else "") + " --- |",
    ]
    for r in rows:
        pct = f"{r['minigpt_roofline_pct']} %" if "minigpt_roofline_pct" in r else "—"
        line = (f"| {r['shape']} | {r['dtype']} | {r['threads']} | {r['batch']} | {r['minigpt']} | {pct} | "
                f"{r['transformers']} | {r['vs_transformers']}x |")
        if llama:
            line += (f" {r['llama.cpp']} ({r['llama.cpp_roofline_pct']} %) | {r['vs_llama.cpp']}x |" if "llama.cpp" in r
                     else " — | — |")
        same = [lib for lib in ("transformers", "llama.cpp") if r.get(f"same_tokens_as_{lib}")]
        line += f" {', '.join(same) if same else 'no'} |"
        lines.append(line)
    for key, value in extra.items():
        if key.startswith("agreement"):
            where = value.get("model", "the random " + key.rsplit("_", 1)[-1] + " model")
            lines += ["", f"bfloat16 vs float32 greedy tokens on {where}: {value['identical']} of {value['prompts']} "
                      f"prompts identical over all {NEW_TOKENS} tokens; the others first differ at token "
                      f"{value['first_difference_at'] or '—'}."]
        elif key.startswith("breakdown"):
            which = key.split("_", 1)[1].replace("_before", f" at commit {value.get('checkout')}")
            lines += ["", f"Where a token's time goes, minigpt float32, batch 1, {which} "
                      f"({value['wall_ms_per_token']:.2f} ms per token, unprofiled):", "",
                      "| part | ms per token |", "| --- | --- |"]
            lines += [f"| {k} | {ms:.3f} |" for k, ms in sorted(value["ms_per_token"].items(), key=lambda kv: -kv[1])]
    if meta["notes"]:
        lines += [""] + [f"Note: {n}." for n in meta["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
