"""Subcommands that run a model or look inside it: sample, inspect, logit-lens, heads,
patch, attention-map."""
from __future__ import annotations

import argparse
import sys

from minigpt.cli.common import MODEL_HELP, add_dtype, add_threads, out_file
from minigpt.ops import BACKENDS


def _sample(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from minigpt.finetune.export import saved_stop
    from minigpt.generate import stream_text
    from minigpt.model_dir import load_for_decoding
    from minigpt.tokenizer import load_tokenizer

    if args.num_samples < 1:
        raise ValueError(f"--num-samples={args.num_samples} must be at least 1")
    model = load_for_decoding(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    tokenizer = load_tokenizer(args.model)
    stop = args.stop or saved_stop(args.model)
    # Samples done so far, on stderr, when it is a terminal (disable=None) and there are several;
    # the bar is cleared while a sample streams to stdout, so the two never share a line.
    bar = tqdm(total=args.num_samples, desc="samples", unit="sample", leave=False, dynamic_ncols=True,
               disable=None if args.num_samples > 1 else True)
    for i in range(args.num_samples):
        bar.clear()
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        pieces = stream_text(  # checks the prompt and settings now, before anything is printed
            model, tokenizer, args.prompt, args.max_new_tokens,
            stop=stop, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            seed=None if args.seed is None else args.seed + i, use_cache=not args.no_cache,
        )
        sys.stdout.write(args.prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        bar.update(1)
    bar.close()


def add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a model folder, streaming tokens as they come")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[],
                   help="stop string (repeatable; default: a fine-tuned model's own stop sequence)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--backend", choices=BACKENDS, default="sdpa")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every step")
    add_dtype(p)
    add_threads(p)
    p.set_defaults(func=_sample)


def _inspect(args: argparse.Namespace) -> None:
    if args.mesh is None:
        plan_only = [flag for flag, value in (("--gpu-memory", args.gpu_memory), ("--dtype", args.dtype))
                     if value is not None]
        if plan_only:
            raise ValueError(f"{' and '.join(plan_only)} only apply to the memory plan, which --mesh asks "
                             f"for; add --mesh (e.g. --mesh dp_shard=1 for one GPU) or leave them out")
        from minigpt.report import report

        print(report(args.source, seq_len=args.seq_len, batch_size=args.batch_size, as_json=args.json,
                     backend=args.backend))
        return
    from minigpt.memory_plan import plan_report

    print(plan_report(args.source, args.mesh, batch_size=args.batch_size, seq_len=args.seq_len,
                      dtype=args.dtype or "bf16", gpu_memory_gib=80.0 if args.gpu_memory is None else args.gpu_memory,
                      backend=args.backend, as_json=args.json))


def add_inspect_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="parameters by component, FLOPs and memory of a preset, config file or model folder; "
        "with --mesh, the training memory per rank",
        description="Parameters by component, FLOPs per token and memory, computed from the config alone "
        "(nothing is allocated: gpt3-175b is instant). SOURCE 'gpt3' prints the GPT-3 paper's Table 2.1 "
        "beside minigpt's eight GPT-3 presets. With --mesh, instead, the memory plan: per rank of a device mesh "
        "(FSDP2 over dp_shard, tensor and sequence parallelism over tp), parameters, gradients, AdamW state and "
        "activations without and with activation checkpointing, their total and whether it fits --gpu-memory.",
    )
    p.add_argument("source", metavar="PRESET|CONFIG_JSON|MODEL_DIR|gpt3")
    p.add_argument("--seq-len", "--seq", type=int, default=None,
                   help="context for attention FLOPs, activations, KV cache (default block_size)")
    p.add_argument("--batch-size", "--batch", type=int, default=1,
                   help="sequences per batch for activation and KV totals (with --mesh: per data-parallel rank)")
    p.add_argument("--backend", default="sdpa", choices=["math", "sdpa", "triton"],
                   help="attention backend whose work the 'computed' FLOPs and activations follow (default: sdpa)")
    p.add_argument("--mesh", default=None, metavar="dp_replicate=R,dp_shard=N,tp=M",
                   help="print the memory plan per rank of this mesh (a missing degree is 1; the product is the "
                   "world size), e.g. dp_shard=8,tp=2; dp_shard=1 is one GPU")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="memory of one GPU in GiB that the plan must fit (default 80; needs --mesh)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                   help="training precision of the plan: fp32, or bf16 autocast over fp32 master weights "
                   "(default bf16; needs --mesh)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=_inspect)


def _logit_lens(args: argparse.Namespace) -> None:
    from minigpt.lens import lens_report

    print(lens_report(args.model, args.prompt, top_k=args.top_k, position=args.position,
                      device=args.device, as_json=args.json))


def add_logit_lens_parser(sub) -> None:
    p = sub.add_parser(
        "logit-lens",
        help="top-k next tokens read from every layer's residual stream (the logit lens)",
        description="Read each layer's residual stream through the final LayerNorm and the LM head and print "
        "the top-k next tokens per layer; the last row is the model's own prediction.",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--prompt", required=True)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--position", type=int, default=-1, help="token position to read (default: the last)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    add_threads(p)
    p.set_defaults(func=_logit_lens)


def _heads(args: argparse.Namespace) -> None:
    from minigpt.experiments import heads_report

    print(heads_report(args.model, args.out, half=args.half, device=args.device))


def add_heads_parser(sub) -> None:
    p = sub.add_parser(
        "heads",
        help="induction and previous-token scores of every attention head (PNG heatmaps)",
        description="Feed random tokens repeated twice and measure, per head, the attention from each token of "
        "the second copy to the token after its first occurrence (induction, Olsson et al. 2022) and to the "
        "token before it (previous token).",
    )
    p.add_argument("--half", type=int, default=None, help="length of each random copy (default min(block_size/2, 50))")
    _add_model_out_device(p, "heads.png", _heads)


def _patch(args: argparse.Namespace) -> None:
    from minigpt.experiments import patch_report

    print(patch_report(args.model, args.clean, args.corrupt, args.answer, args.wrong, args.out, device=args.device))


def add_patch_parser(sub) -> None:
    p = sub.add_parser(
        "patch",
        help="activation patching: which layer, position and head carry the clean prompt's answer (PNG)",
        description="Run the corrupted prompt with one activation at a time taken from the clean prompt (the "
        "residual stream at each layer and position, each head's output) and score logit(answer) - "
        "logit(wrong): 1 = the clean run's score, 0 = the corrupted run's.",
    )
    p.add_argument("--clean", required=True, help="prompt whose activations are patched in")
    p.add_argument("--corrupt", required=True, help="prompt of the same number of tokens that is patched")
    p.add_argument("--answer", required=True, help="the clean prompt's next token, e.g. ' Mary' (one token)")
    p.add_argument("--wrong", required=True, help="the corrupted prompt's next token (one token)")
    _add_model_out_device(p, "patch.png", _patch)


def _add_model_out_device(p: argparse.ArgumentParser, out: str, func) -> None:
    """The flags the experiment commands share: the model, the PNG they write, the device."""
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--out", type=out_file, default=out, help="PNG file to write")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=func)


def _index_list(text: str) -> list[int] | None:
    """'0,2,5' -> [0, 2, 5]; 'all' -> None (every index)."""
    if text == "all":
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of indices like 0,1 (or 'all')") from None


def _attention_map(args: argparse.Namespace) -> None:
    from minigpt.attention_map import save_attention_map, save_mask_pattern

    if args.pattern is not None:
        path = save_mask_pattern(args.pattern, args.out, seq_len=args.seq_len)
    else:
        if args.prompt is None:
            raise ValueError("--model needs --prompt, the text whose attention to draw")
        path = save_attention_map(args.model, args.prompt, args.out, args.layers, args.heads, device=args.device)
    print(f"wrote {path}")


def add_attention_map_parser(sub) -> None:
    p = sub.add_parser(
        "attention-map",
        help="draw a model's attention for a prompt, or the mask pattern of each layer kind",
        description="With --model: a PNG grid of the attention probabilities of the chosen layers and heads, "
        "tokens on both axes. With --pattern: the kind of every layer and the mask of each kind (dense, "
        "banded with its window); needs no weights.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help=MODEL_HELP)
    what.add_argument("--pattern", metavar="PRESET|CONFIG_JSON|MODEL_DIR", help="draw the masks of this config")
    p.add_argument("--prompt", help="text whose attention to draw (with --model)")
    p.add_argument("--layers", type=_index_list, default=None, help="e.g. 0,1 (default: all)")
    p.add_argument("--heads", type=_index_list, default=None, help="e.g. 0,1 (default: all)")
    p.add_argument("--seq-len", type=int, default=None, help="mask size for --pattern (default block_size)")
    p.add_argument("--out", type=out_file, required=True, help="PNG file to write")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_attention_map)
