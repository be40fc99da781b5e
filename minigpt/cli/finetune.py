"""Fine-tuning subcommands: finetune check, finetune classify, finetune completion."""
from __future__ import annotations

import argparse

from minigpt.cli.common import (
    MODEL_HELP, add_columns, add_encoding, add_field, add_overrides, add_pair_columns, add_threads, config_from_args,
    out_file, out_folder,
)
from minigpt.finetune.config import CLASS_WEIGHTS, FINETUNE_TRAIN, LORA_LR, TASKS, TRAIN_SECTION, FinetuneConfig

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
    c.add_argument("--model", default=None, help=f"whose tokenizer and context length to check against: {MODEL_HELP}")
    c.add_argument("--block-size", type=int, default=None, help="context length (default: the model's, else 1024)")
    c.add_argument("--fix", action="store_true", help="write a cleaned JSONL copy; every dropped or changed row is listed")
    c.add_argument("--out", type=out_file, default=None, help="where --fix writes (default: ./FILE.fixed.jsonl in the current folder)")
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
        # --init is required here (the library also takes None, when the model is passed to
        # `finetune` directly), so its help is the command line's own.
        t.add_argument("--init", required=True, help=f"what to start from: {MODEL_HELP}; or a preset name "
                                                     f"(e.g. tiny-bpe, gpt2) for a fresh random model, the "
                                                     f"from-scratch baseline")
        add_field(t, FinetuneConfig, "train_file")
        add_field(t, FinetuneConfig, "val_file")
        add_field(t, FinetuneConfig, "val_fraction")
        # --out, --resume and --overwrite are the run folder's (TrainConfig.out_dir and `finetune`'s
        # arguments), not FinetuneConfig's.
        t.add_argument("--out", type=out_folder, required=True, help="run folder (checkpoints, metrics.jsonl, model/, eval/)")
        t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
        t.add_argument("--overwrite", action="store_true",
                       help="start afresh when --out holds a run, moving that run aside to OUT.old-<time>")
        add_encoding(t)
        if task == "classify":
            add_columns(t)
            add_field(t, FinetuneConfig, "max_length")
            add_field(t, FinetuneConfig, "class_weights", choices=CLASS_WEIGHTS)
            for name in ("as_completion", "template", "label_prefix"):
                add_field(t, FinetuneConfig, name)
        elif task == "completion":
            add_pair_columns(t)
            add_field(t, FinetuneConfig, "packing")
            add_field(t, FinetuneConfig, "add_eos", flag="--no-eos")
        else:  # a new task in TASKS needs its data flags here
            raise ValueError(f"no command-line flags are defined for fine-tuning task {task!r}")
        for name in ("bos", "sep_token", "pad_token", "train_last_blocks", "lora_rank", "lora_alpha", "lora_dropout"):
            action = add_field(t, FinetuneConfig, name)
            if name == "lora_rank":  # 0 is the library's "no LoRA" (the flag's default); written out,
                action.type = _lora_rank  # it would train every parameter while seeming to ask for adapters
        add_threads(t)
        add_overrides(t, TRAIN_SECTION)
        t.set_defaults(func=_finetune_train, task=task)


def _lora_rank(text: str) -> int:
    """--lora-rank's type: a rank >= 1; a 0 given on the command line is refused, not taken as 'off'."""
    rank = int(text)
    if rank < 1:
        raise argparse.ArgumentTypeError(
            f"--lora-rank={rank} must be at least 1 (LoRA adapters of that rank, e.g. 8); a rank of 0 would train "
            f"every parameter: leave --lora-rank out for that")
    return rank


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """The FinetuneConfig of a `finetune classify|completion` command line."""
    return config_from_args(FinetuneConfig, args)


def _finetune_train(args: argparse.Namespace) -> None:
    from minigpt.finetune.config import default_train_config, train_overrides
    from minigpt.finetune.run import finetune

    config = finetune_config(args)
    result = finetune(config, default_train_config(config, args.out, train_overrides(args.overrides)),
                      resume=args.resume, overwrite=args.overwrite)
    if result.report is not None:
        print(result.report.format())
        print(f"model: {result.model_dir}")


def _finetune_defaults() -> str:
    values = ", ".join(f"{k}={v}" for k, v in FINETUNE_TRAIN.items())
    return (f"{values}; with LoRA lr={LORA_LR:g}; classifiers keep the checkpoint with the best val_accuracy, "
            f"completion models the lowest val_loss")
