"""Evaluation subcommands: fewshot, evaluate and predict (fine-tuned and few-shot
classifiers), eval (zero-/few-shot task files)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from minigpt.cli.common import (
    MODEL_HELP, add_columns, add_encoding, add_field, add_pair_columns, add_threads, config_from_args, out_folder,
)
from minigpt.finetune.config import FinetuneConfig
from minigpt.ops import BACKENDS

if TYPE_CHECKING:
    from minigpt.evaluation.prompts import PromptFormat
    from minigpt.finetune.fewshot import FewShotPrompt


def fewshot_prompt(args: argparse.Namespace) -> FewShotPrompt:
    """The FewShotPrompt of a `fewshot` command line."""
    from minigpt.finetune.fewshot import FewShotPrompt

    return config_from_args(FewShotPrompt, args, verbalizers=dict(args.verbalizer))


def _fewshot(args: argparse.Namespace) -> None:
    from minigpt.finetune.evaluate import evaluate_fewshot

    report = evaluate_fewshot(args.model, args.shots, args.data, k=args.k, prompt=fewshot_prompt(args),
                              seed=args.seed, limit=args.limit, out_dir=args.out, text_column=args.text_column,
                              label_column=args.label_column, encoding=args.encoding,
                              merge_label_case=args.merge_label_case, device=args.device)
    print(report.format())


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected LABEL=WORDS, got {text!r}")
    return key, value


def add_fewshot_parser(sub) -> None:
    from minigpt.finetune.fewshot import FewShotPrompt

    p = sub.add_parser("fewshot", help="classify a labeled file by k-shot prompting, no training (the baseline)")
    p.add_argument("model", help=f"language model: {MODEL_HELP}")
    p.add_argument("--shots", required=True, help="labeled file (CSV/TSV/JSONL) to draw the k examples from")
    p.add_argument("--data", required=True, help="labeled file to evaluate on")
    p.add_argument("--k", type=int, default=4, help="examples in the prompt, balanced over labels")
    for name in ("template", "label_prefix", "separator"):
        add_field(p, FewShotPrompt, name)
    # FewShotPrompt.verbalizers is a dict: here one LABEL=WORDS pair per --verbalizer.
    p.add_argument("--verbalizer", type=_key_value, action="append", default=[],
                   help="LABEL=WORDS to write a label differently in the prompt (repeatable)")
    add_field(p, FewShotPrompt, "normalize")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=out_folder, default=None, help="folder for metrics.json, report.txt, "
                                                                 "confusion_matrix.png")
    p.add_argument("--device", default="cpu")
    add_columns(p)
    add_encoding(p)
    add_threads(p)
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
    p.add_argument("--out", type=out_folder, default=None, help="folder for metrics.json, report.txt (and "
                                                                 "confusion_matrix.png); "
                                               "default: print only")
    p.add_argument("--overwrite", action="store_true", help="replace an evaluation already in --out")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-generate", type=int, default=100, help="completion models: prompts to complete for exact match")
    p.add_argument("--device", default="cpu")
    add_columns(p)
    add_pair_columns(p)
    add_encoding(p)
    add_threads(p)
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
    add_field(p, FinetuneConfig, "text_column")
    add_encoding(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line, with every class's probability")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    add_threads(p)
    p.set_defaults(func=_predict)


def prompt_format(args: argparse.Namespace) -> PromptFormat:
    """The PromptFormat of an `eval` command line ('' for --unconditional-prompt is None)."""
    from minigpt.evaluation.prompts import PromptFormat

    return config_from_args(PromptFormat, args, unconditional_prompt=args.unconditional_prompt or None)


def _eval(args: argparse.Namespace) -> None:
    from minigpt.evaluation.harness import format_table, run_eval

    results = run_eval(args.tasks, args.model, shots=args.shots, demos=args.demos,
                       fewshot_file=args.fewshot_file, limit=args.limit,
                       out_dir=args.out, seed=args.seed, device=args.device, batch_size=args.batch_size,
                       backend=args.backend, fmt=prompt_format(args))
    print(format_table(results))
    if args.out is not None:
        print(f"wrote {args.out}/results.json, examples.jsonl, results.md")


def add_eval_parser(sub) -> None:
    from minigpt.evaluation.prompts import PromptFormat

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
    p.add_argument("--demos", default=None, help="JSONL of demonstrations, K drawn per example "
                   "(default: the task's other examples)")
    p.add_argument("--fewshot-file", default=None, metavar="DEMOS.jsonl",
                   help="fixed demonstrations instead: the file's first K rows (--shots K), in order, for every "
                   "example, as lm-evaluation-harness's first_n sampler gives them")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each task")
    p.add_argument("--out", type=out_folder, default=None, help="folder for results.json, examples.jsonl, "
                                                                 "results.md")
    p.add_argument("--seed", type=int, default=1337, help="seed of the demonstration draw")
    add_field(p, PromptFormat, "separator")
    add_field(p, PromptFormat, "target_delimiter")
    add_field(p, PromptFormat, "unconditional_prompt", note="On the command line '' skips it.")
    add_field(p, PromptFormat, "stop")
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward pass")
    p.add_argument("--backend", choices=BACKENDS, default="sdpa")
    p.add_argument("--device", default="cpu")
    add_threads(p)
    p.set_defaults(func=_eval)
