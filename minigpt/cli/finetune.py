"""Fine-tuning subcommands: finetune check, finetune classify, finetune completion."""
from __future__ import annotations

import argparse

from minigpt.cli.common import MODEL_HELP, add_columns, add_encoding, add_pair_columns, add_threads
from minigpt.finetune.config import CLASS_WEIGHTS, FINETUNE_TRAIN, LORA_LR, TASKS

TASK_HELP = {
    "classify": "train a classification head (and the model) on a labeled CSV/TSV/JSONL",
    "completion": "train on prompt/completion JSONL; the loss covers completions only",
}
"""One line of help per fine-tuning task (`minigpt.finetune.config.TASKS`), its subcommand's."""


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
    add_pair_columns(c)
    add_encoding(c)
    c.set_defaults(func=_finetune_check)
    for task in TASKS:
        help_text = TASK_HELP[task]
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
        add_encoding(t)
        if task == "classify":
            add_columns(t)
            t.add_argument("--max-length", type=int, default=None, help="tokens kept per text (default: block_size)")
            t.add_argument("--class-weights", choices=CLASS_WEIGHTS, default="none")
            t.add_argument("--as-completion", action="store_true",
                           help="no head: teach each label word as the completion of --template (prompt masked); "
                                "scored by label log-likelihood and greedy exact match")
            t.add_argument("--template", default="Review: {text}\\nSentiment:",
                           help="with --as-completion: each row's prompt; must contain {text}")
            t.add_argument("--label-prefix", default=" ", help="with --as-completion: between prompt and label")
        else:
            add_pair_columns(t)
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
        add_threads(t)
        t.set_defaults(func=_finetune_train, task=task, accepts_overrides=True)


def _finetune_train(args: argparse.Namespace) -> None:
    from minigpt.finetune.config import FinetuneConfig, default_train_config, train_overrides
    from minigpt.finetune.run import finetune

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


def _finetune_defaults() -> str:
    values = ", ".join(f"{k}={v}" for k, v in FINETUNE_TRAIN.items())
    return (f"{values}; with LoRA lr={LORA_LR:g}; classifiers keep the checkpoint with the best val_accuracy, "
            f"completion models the lowest val_loss")
