"""The `minigpt` command. Each subcommand parses its arguments and calls one library function."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from minigpt.device import check_device
from minigpt.ops import BACKENDS


def _sample(args: argparse.Namespace) -> None:
    from minigpt.finetune.export import saved_stop
    from minigpt.generate import stream_text
    from minigpt.model import GPT
    from minigpt.tokenizer import load_tokenizer

    if args.num_samples < 1:
        raise ValueError(f"--num-samples={args.num_samples} must be at least 1")
    model = GPT.from_pretrained(args.model, backend=args.backend).to(args.device)
    tokenizer = load_tokenizer(args.model)
    stop = args.stop or saved_stop(args.model)
    for i in range(args.num_samples):
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
    _add_threads(p)
    p.set_defaults(func=_sample)


def _inspect(args: argparse.Namespace) -> None:
    from minigpt.report import report

    print(report(args.source, seq_len=args.seq_len, batch_size=args.batch_size, as_json=args.json,
                 backend=args.backend))


def add_inspect_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="parameters by component, FLOPs and memory of a preset, config file or model folder",
        description="Parameters by component, FLOPs per token and memory, computed from the config alone "
        "(nothing is allocated: gpt3-175b is instant). SOURCE 'gpt3' prints the GPT-3 paper's Table 2.1 "
        "beside minigpt's eight GPT-3 presets.",
    )
    p.add_argument("source", metavar="PRESET|CONFIG_JSON|MODEL_DIR|gpt3")
    p.add_argument("--seq-len", type=int, default=None, help="context for attention FLOPs, activations, KV cache (default block_size)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per batch for activation and KV totals")
    p.add_argument("--backend", default="sdpa", choices=["math", "sdpa", "triton"],
                   help="attention backend whose work the 'computed' FLOPs and activations follow (default: sdpa)")
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
    _add_threads(p)
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
    p.add_argument("--model", required=True, help="model folder (Hugging Face GPT-2/GPT-Neo layout or minigpt's)")
    p.add_argument("--out", default="heads.png", help="PNG file to write")
    p.add_argument("--half", type=int, default=None, help="length of each random copy (default min(block_size/2, 50))")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_heads)


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
    p.add_argument("--model", required=True, help="model folder (Hugging Face GPT-2/GPT-Neo layout or minigpt's)")
    p.add_argument("--clean", required=True, help="prompt whose activations are patched in")
    p.add_argument("--corrupt", required=True, help="prompt of the same number of tokens that is patched")
    p.add_argument("--answer", required=True, help="the clean prompt's next token, e.g. ' Mary' (one token)")
    p.add_argument("--wrong", required=True, help="the corrupted prompt's next token (one token)")
    p.add_argument("--out", default="patch.png", help="PNG file to write")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_patch)


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
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_attention_map)
def _prepare(args: argparse.Namespace) -> None:
    from minigpt.data import PrepareConfig, prepare

    prepare(PrepareConfig(
        inputs=tuple(args.inputs), out_dir=args.out, tokenizer=args.tokenizer, chars=args.chars,
        val_fraction=args.val_fraction, text_field=args.text_field, errors=args.errors,
        eos=False if args.no_eos else None, shard_tokens=args.shard_tokens, num_workers=args.workers,
    ))


def add_prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize text files, folders or JSONL into token shards")
    p.add_argument("inputs", nargs="+", help="text files, folders of them, or .jsonl files")
    p.add_argument("--out", required=True, help="output folder (meta.json + shards)")
    p.add_argument("--tokenizer", choices=("gpt2", "char"), default="gpt2")
    p.add_argument("--chars", default=None, help="the char tokenizer's alphabet (default: every character seen)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the input, at its end, held out")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="undecodable UTF-8: stop with file and offset, or replace with U+FFFD")
    p.add_argument("--no-eos", action="store_true", help="do not separate documents with <|endoftext|>")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.add_argument("--workers", type=int, default=0, help="tokenizer threads (0: one per core)")
    p.set_defaults(func=_prepare)


def _train(args: argparse.Namespace) -> None:
    from minigpt.train.pretrain import load_config, pretrain

    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    if args.out_dir is not None:
        overrides.append(f"train.out_dir={args.out_dir}")
    config = load_config(args.preset, args.config, overrides)
    if args.show_config:
        import json

        print(json.dumps(config.to_dict(), indent=2))
        return
    result = pretrain(config, resume=args.resume, overwrite=args.overwrite)
    if result.sample is not None:
        print(f"--- sample from {result.train.last_checkpoint} ---")
        print(result.sample)


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train", allow_abbrev=False, help="pretrain a model (torchrun --nproc_per_node=N -m minigpt train ... for DDP)",
        description="Pretrain from a recipe (--preset), a TOML/JSON file (--config) and overrides "
                    "--section.key=value or --key=value (sections: model, train, data, sample).",
        epilog=_train_epilog(),
    )
    p.add_argument("--preset", default=None, help="recipe or model preset to start from (default: tiny)")
    p.add_argument("--config", default=None, help="TOML or JSON file with sections model/train/data/sample")
    p.add_argument("--data", default=None, help="prepared folder, or text/JSONL to prepare (default: download "
                                                "tiny Shakespeare)")
    p.add_argument("--out-dir", default=None, help="run folder (train.out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that holds a run, moving that run aside to OUT.old-<time>")
    p.add_argument("--show-config", action="store_true", help="print the effective config as JSON and exit")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an override such as train.lr=1e-3 (repeatable); --train.lr=1e-3 works too")
    _add_threads(p)
    p.set_defaults(func=_train, accepts_overrides=True)


def _plot(args: argparse.Namespace) -> None:
    from minigpt.plot import plot_run

    print(plot_run(args.run_dir, args.out, x=args.x))


def add_plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's train/validation loss curves to a PNG")
    p.add_argument("run_dir", help="run folder holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/loss.png)")
    p.add_argument("--x", choices=("step", "time"), default="step",
                   help="horizontal axis: update number, or wall-clock seconds of training")
    p.set_defaults(func=_plot)


def _finetune_check(args: argparse.Namespace) -> None:
    from minigpt.finetune.check import check_file

    report = check_file(args.file, model=args.model, block_size=args.block_size, fix=args.fix, out=args.out,
                        prompt_column=args.prompt_column, completion_column=args.completion_column,
                        encoding=args.encoding)
    print(report.format())
    if report.errors and report.written is None:  # warnings alone exit 0
        raise SystemExit(1)


def add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model: check data, train a classifier or a completion model")
    actions = p.add_subparsers(dest="action", required=True)
    c = actions.add_parser(
        "check", help="check a prompt/completion CSV/TSV/JSON/JSONL file; --fix writes a cleaned JSONL copy",
        description="Report rows, duplicates, empty fields, over-long rows, shared prefixes, the separator and "
                    "stop sequence, and leading spaces, as OpenAI's prepare_data does. Exits 1 when rows are "
                    "unusable (unless --fix wrote a cleaned copy), 0 with warnings only.")
    c.add_argument("file", help="CSV/TSV (with a header), JSON array of objects, or JSONL (one object per line)")
    c.add_argument("--model", default=None, help="model folder whose tokenizer and context length to check against")
    c.add_argument("--block-size", type=int, default=None, help="context length (default: the model's, else 1024)")
    c.add_argument("--fix", action="store_true", help="write a cleaned JSONL copy; every dropped or changed row is listed")
    c.add_argument("--out", default=None, help="where --fix writes (default: ./FILE.fixed.jsonl in the current folder)")
    _add_pair_columns(c)
    _add_encoding(c)
    c.set_defaults(func=_finetune_check)
    for task, help_text in (("classify", "train a classification head (and the model) on a labeled CSV/TSV/JSONL"),
                            ("completion", "train on prompt/completion JSONL; the loss covers completions only")):
        t = actions.add_parser(
            task, help=help_text, allow_abbrev=False,
            description=f"{help_text}. Training settings (TrainConfig fields) are overrides such as "
                        f"--max_steps=500 --lr=1e-4 --batch_size=16 (or --train.lr=...). Their defaults here: "
                        f"{_finetune_defaults()}. The best checkpoint is exported to OUT/model and evaluated "
                        f"into OUT/eval.")
        t.add_argument("--init", required=True, help=f"what to start from: {MODEL_HELP}; or a preset name "
                                                     f"(e.g. tiny-bpe, gpt2) for a fresh random model, the "
                                                     f"from-scratch baseline")
        t.add_argument("--train-file", required=True, help="training data")
        t.add_argument("--val-file", default=None, help="validation data (default: hold out --val-fraction)")
        t.add_argument("--val-fraction", type=float, default=0.1)
        t.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, model/, eval/)")
        t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
        t.add_argument("--overwrite", action="store_true",
                       help="start afresh when --out holds a run, moving that run aside to OUT.old-<time>")
        _add_encoding(t)
        if task == "classify":
            _add_columns(t)
            t.add_argument("--max-length", type=int, default=None, help="tokens kept per text (default: block_size)")
            t.add_argument("--class-weights", choices=("none", "balanced"), default="none")
            t.add_argument("--as-completion", action="store_true",
                           help="no head: teach each label word as the completion of --template (prompt masked); "
                                "scored by label log-likelihood and greedy exact match")
            t.add_argument("--template", default="Review: {text}\\nSentiment:",
                           help="with --as-completion: each row's prompt; must contain {text}")
            t.add_argument("--label-prefix", default=" ", help="with --as-completion: between prompt and label")
        else:
            _add_pair_columns(t)
            t.add_argument("--packing", action="store_true", help="pack several examples per row instead of padding")
            t.add_argument("--no-eos", action="store_true", help="do not append eos to completions")
        t.add_argument("--bos", default="", help="special token before every prompt, e.g. '<|startoftext|>' "
                                                 "(added to the tokenizer and the model when new)")
        t.add_argument("--sep-token", default="", help="special token after every prompt, e.g. '<|sep|>' (added if new)")
        t.add_argument("--pad-token", default="", help="special token to pad batches with, e.g. '<|pad|>' "
                                                       "(added if new; default: eos)")
        t.add_argument("--train-last-blocks", type=int, default=None,
                       help="train only the last N blocks, final LayerNorm and head (0: the head alone)")
        t.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: no LoRA); only adapters train")
        t.add_argument("--lora-alpha", type=float, default=16.0)
        t.add_argument("--lora-dropout", type=float, default=0.0)
        t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="a TrainConfig override such as lr=1e-4 (repeatable); --lr=1e-4 works too")
        _add_threads(t)
        t.set_defaults(func=_finetune_train, task=task, accepts_overrides=True)


def _finetune_train(args: argparse.Namespace) -> None:
    from minigpt.train.finetune import FinetuneConfig, default_train_config, finetune, train_overrides

    fields = dict(task=args.task, init=args.init, train_file=args.train_file, val_file=args.val_file,
                  val_fraction=args.val_fraction, train_last_blocks=args.train_last_blocks,
                  lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                  encoding=args.encoding, bos=args.bos, sep_token=args.sep_token, pad_token=args.pad_token)
    if args.task == "classify":
        fields.update(text_column=args.text_column, label_column=args.label_column, max_length=args.max_length,
                      class_weights=args.class_weights, merge_label_case=args.merge_label_case,
                      as_completion=args.as_completion, template=args.template.replace("\\n", "\n"),
                      label_prefix=args.label_prefix)
    else:
        fields.update(packing=args.packing, add_eos=not args.no_eos, prompt_column=args.prompt_column,
                      completion_column=args.completion_column)
    config = FinetuneConfig(**fields)
    result = finetune(config, default_train_config(config, args.out, train_overrides(args.overrides)),
                      resume=args.resume, overwrite=args.overwrite)
    if result.report is not None:
        print(result.report.format())
        print(f"model: {result.model_dir}")


def _fewshot(args: argparse.Namespace) -> None:
    from minigpt.finetune.evaluate import evaluate_fewshot
    from minigpt.finetune.fewshot import FewShotPrompt

    prompt = FewShotPrompt(template=args.template.replace("\\n", "\n"), label_prefix=args.label_prefix,
                           separator=args.separator.replace("\\n", "\n"), verbalizers=dict(args.verbalizer),
                           normalize=args.normalize)
    report = evaluate_fewshot(args.model, args.shots, args.data, k=args.k, prompt=prompt, seed=args.seed,
                              limit=args.limit, out_dir=args.out, text_column=args.text_column,
                              label_column=args.label_column, encoding=args.encoding,
                              merge_label_case=args.merge_label_case, device=args.device)
    print(report.format())


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected LABEL=WORDS, got {text!r}")
    return key, value


def _add_columns(p) -> None:
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--merge-label-case", action="store_true",
                   help="treat labels that differ only by case or surrounding whitespace as one class "
                        "(default: an error listing the spellings)")


def _add_pair_columns(p) -> None:
    p.add_argument("--prompt-column", default="prompt", help="column (or JSON field) holding the prompt")
    p.add_argument("--completion-column", default="completion", help="column (or JSON field) holding the completion")


def _add_encoding(p) -> None:
    p.add_argument("--encoding", default="utf-8",
                   help="text encoding of the data files, e.g. latin-1 or cp1252 (a UTF-8 BOM is always dropped)")


def add_fewshot_parser(sub) -> None:
    p = sub.add_parser("fewshot", help="classify a labeled file by k-shot prompting, no training (the baseline)")
    p.add_argument("model", help=f"language model: {MODEL_HELP}")
    p.add_argument("--shots", required=True, help="labeled file (CSV/TSV/JSONL) to draw the k examples from")
    p.add_argument("--data", required=True, help="labeled file to evaluate on")
    p.add_argument("--k", type=int, default=4, help="examples in the prompt, balanced over labels")
    p.add_argument("--template", default="Review: {text}\\nSentiment:", help="one example; must contain {text}")
    p.add_argument("--label-prefix", default=" ", help="between the template and the label")
    p.add_argument("--separator", default="\\n\\n", help="between examples")
    p.add_argument("--verbalizer", type=_key_value, action="append", default=[],
                   help="LABEL=WORDS to write a label differently in the prompt (repeatable)")
    p.add_argument("--normalize", action="store_true", help="score by mean, not summed, token log-likelihood")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default=None, help="folder for metrics.json, report.txt, confusion_matrix.png")
    p.add_argument("--device", default="cpu")
    _add_columns(p)
    _add_encoding(p)
    _add_threads(p)
    p.set_defaults(func=_fewshot)


def _evaluate(args: argparse.Namespace) -> None:
    from minigpt.finetune.evaluate import evaluate

    if args.out is not None and (Path(args.out) / "metrics.json").is_file() and not args.overwrite:
        raise ValueError(f"{args.out} already holds an evaluation (metrics.json); choose another --out, or pass "
                         f"--overwrite to replace it")
    report = evaluate(args.model, args.data, out_dir=args.out, text_column=args.text_column,
                      label_column=args.label_column, prompt_column=args.prompt_column,
                      completion_column=args.completion_column, encoding=args.encoding,
                      merge_label_case=args.merge_label_case, batch_size=args.batch_size,
                      max_generate=args.max_generate, device=args.device)
    print(report.format())


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a fine-tuned model on a labeled or prompt/completion file")
    p.add_argument("model", help="fine-tuned model folder, or the fine-tuning run folder (--out) that holds it")
    p.add_argument("data", help="labeled (classifier) or prompt/completion file: CSV, TSV, JSON array or JSONL")
    p.add_argument("--out", default=None, help="folder for metrics.json, report.txt (and confusion_matrix.png); "
                                               "default: print only")
    p.add_argument("--overwrite", action="store_true", help="replace an evaluation already in --out")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-generate", type=int, default=100, help="completion models: prompts to complete for exact match")
    p.add_argument("--device", default="cpu")
    _add_columns(p)
    _add_pair_columns(p)
    _add_encoding(p)
    _add_threads(p)
    p.set_defaults(func=_evaluate)


def _predict(args: argparse.Namespace) -> None:
    import json

    from minigpt.finetune.evaluate import predict

    for p in predict(args.model, args.texts, file=args.file, text_column=args.text_column, encoding=args.encoding,
                     batch_size=args.batch_size, device=args.device):
        if args.json:
            print(json.dumps({"text": p.text, "label": p.label, "probabilities": p.probabilities}, ensure_ascii=False))
        else:
            print(f"{p.label}\t{p.probabilities[p.label]:.3f}\t{p.text}")


def add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="labels from a fine-tuned classifier (label, probability, text per line)")
    p.add_argument("model", help="fine-tuned classifier folder, or the fine-tuning run folder (--out) that holds it")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--file", default=None, help=".txt (one text per line) or CSV/TSV/JSON/JSONL with --text-column")
    p.add_argument("--text-column", default="text")
    _add_encoding(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line, with every class's probability")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    _add_threads(p)
    p.set_defaults(func=_predict)


def _eval(args: argparse.Namespace) -> None:
    from minigpt.evaluation.harness import format_table, run_eval
    from minigpt.evaluation.prompts import PromptFormat

    fmt = PromptFormat(separator=args.separator.replace("\\n", "\n"), target_delimiter=args.target_delimiter,
                       unconditional_prompt=args.unconditional_prompt or None,
                       stop=args.stop.replace("\\n", "\n"))
    results = run_eval(args.tasks, args.model, shots=args.shots, demos=args.demos, limit=args.limit,
                       out_dir=args.out, seed=args.seed, device=args.device, batch_size=args.batch_size,
                       backend=args.backend, fmt=fmt)
    print(format_table(results))
    if args.out is not None:
        print(f"wrote {args.out}/results.json, examples.jsonl, results.md")


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="zero-/few-shot evaluation on JSONL task files (multiple choice, cloze, free-form)",
        description="Evaluate a language model the way the GPT-3 paper does (section 2.4): K demonstrations "
        "per example, then the context; multiple-choice answers scored by log-likelihood (acc, acc_norm, "
        "acc_uncond), cloze by greedy exact match and log-likelihood of the last word, free-form by exact "
        "match and token F1 of a greedy completion. File formats: see the README's Evaluation section.",
    )
    p.add_argument("tasks", nargs="+", metavar="TASK.jsonl", help="task files (one type per file)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--shots", type=int, default=0, help="demonstrations per example (K)")
    p.add_argument("--demos", default=None, help="JSONL of demonstrations (default: the task's other examples)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each task")
    p.add_argument("--out", default=None, help="folder for results.json, examples.jsonl, results.md")
    p.add_argument("--seed", type=int, default=1337, help="seed of the demonstration draw")
    p.add_argument("--separator", default="\\n\\n", help="between demonstrations (\\n for a newline)")
    p.add_argument("--target-delimiter", default=" ", help="between a context and its choice")
    p.add_argument("--unconditional-prompt", default="Answer:",
                   help="neutral context for acc_uncond ('' to skip it)")
    p.add_argument("--stop", default="\\n", help="free-form: cut a greedy completion at this string")
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward pass")
    p.add_argument("--backend", choices=BACKENDS, default="sdpa")
    p.add_argument("--device", default="cpu")
    _add_threads(p)
    p.set_defaults(func=_eval)


def _pair_overrides(extra: list[str]) -> list[str]:
    """['--a=1', '--b', '2', '--flag'] -> ['a=1', 'b=2', 'flag']."""
    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--"):
            raise ValueError(f"unexpected argument {item!r}; overrides look like --train.lr=1e-3")
        if "=" not in item and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            item, i = f"{item}={extra[i + 1]}", i + 1
        out.append(item[2:])
        i += 1
    return out


MODEL_HELP = ("a model folder (Hugging Face GPT-2/GPT-Neo layout or minigpt's), a training run folder (its best "
              "checkpoint) or a fine-tuning run folder (its exported model)")



class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default, and keeps the epilog's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default" in help_text:  # the help already says what the default means
            return help_text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help (and every subcommand's) shows the defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _train_epilog() -> str:
    from minigpt.config import PRESETS
    from minigpt.train.pretrain import RECIPES

    return ("recipes (--preset): " + ", ".join(RECIPES) + "; or any model preset with GPT-2's training "
            "recipe: " + ", ".join(p for p in PRESETS if p not in RECIPES) + ".\n"
            "keys: model = GPTConfig fields (minigpt/config.py), train = TrainConfig fields "
            "(minigpt/train/loop.py), data = DataConfig and sample = SampleConfig fields "
            "(minigpt/train/pretrain.py), each documented there; an unknown key is an error that lists the "
            "valid ones. `minigpt train --preset NAME --show-config` prints a recipe in full.")


def _finetune_defaults() -> str:
    from minigpt.train.finetune import FINETUNE_TRAIN, LORA_LR

    values = ", ".join(f"{k}={v}" for k, v in FINETUNE_TRAIN.items())
    return (f"{values}; with LoRA lr={LORA_LR:g}; classifiers keep the checkpoint with the best val_accuracy, "
            f"completion models the lowest val_loss")


def _resolve_models(args: argparse.Namespace) -> None:
    """Point every model argument at a model folder (`minigpt.model_dir.resolve_model_dir`):
    a training run means its best checkpoint, a fine-tuning run its exported model."""
    from minigpt.model_dir import resolve_model_dir

    if getattr(args, "model", None) is not None:
        args.model = str(resolve_model_dir(args.model))
    if args.command == "inspect" and Path(args.source).is_dir():
        args.source = str(resolve_model_dir(args.source))


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (None: torch's default, one per core); on a busy machine fewer "
                        "can be faster")


def _set_threads(threads: int | None) -> None:
    """torch's CPU threads for this command; on a busy machine fewer can be faster."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minigpt", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)
    add_sample_parser(sub)
    add_inspect_parser(sub)
    add_attention_map_parser(sub)
    add_logit_lens_parser(sub)
    add_heads_parser(sub)
    add_patch_parser(sub)
    add_prepare_parser(sub)
    add_train_parser(sub)
    add_plot_parser(sub)
    add_finetune_parser(sub)
    add_fewshot_parser(sub)
    add_evaluate_parser(sub)
    add_predict_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # only `train` takes free-form --key=value overrides
        if not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        try:
            args.overrides = args.overrides + _pair_overrides(extra)
        except ValueError as err:
            parser.error(str(err))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "device", None) is not None:
            check_device(args.device)
        _set_threads(getattr(args, "threads", None))
        _resolve_models(args)
        args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`minigpt ... | head`): end quietly, as Python's docs recommend
        # (library/signal.html, "Note on SIGPIPE"): point stdout at devnull so the interpreter's
        # final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(1) from None
    except (ValueError, OSError, ArithmeticError) as err:  # OSError: files, downloads; ArithmeticError: NaN loss
        # A user error is one paragraph and exit status 1; -v keeps the traceback for debugging.
        if args.verbose:
            logging.getLogger(__name__).exception("traceback (-v)")
        raise SystemExit(f"minigpt {args.command}: error: {err}") from None
    except KeyboardInterrupt:
        # Ctrl-C is not a crash: no traceback. The run folder's lock is already released and
        # its checkpoints are whole (they are written atomically).
        again = "; the same command with --resume continues from the newest checkpoint" \
            if args.command in ("train", "finetune") else ""
        print(f"minigpt {args.command}: interrupted{again}", file=sys.stderr)
        raise SystemExit(130) from None
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and not _is_out_of_memory(err):
            raise  # a bug: keep the traceback
        if args.verbose:
            logging.getLogger(__name__).exception("traceback (-v)")
        raise SystemExit(f"minigpt {args.command}: error: out of memory ({_first_line(err)}); lower the batch size, "
                         f"the context length (block_size) or the model size, or use a device with more "
                         f"memory") from None


def _is_out_of_memory(err: BaseException) -> bool:
    """torch's allocator failures: torch.OutOfMemoryError on a GPU, a RuntimeError saying it
    "can't allocate memory" on the CPU."""
    import torch

    text = str(err).lower()
    return isinstance(err, getattr(torch, "OutOfMemoryError", ())) or "can't allocate memory" in text \
        or "out of memory" in text


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__


if __name__ == "__main__":
    main()
