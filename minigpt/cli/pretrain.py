"""Pretraining subcommands: prepare, train, plot."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from minigpt.cli.common import add_field, add_overrides, add_threads, config_from_args, field_help, out_file, out_folder

if TYPE_CHECKING:
    from minigpt.pretrain.config import PrepareConfig


def prepare_config(args: argparse.Namespace) -> PrepareConfig:
    """The PrepareConfig of a `prepare` command line."""
    from minigpt.pretrain.config import PrepareConfig

    return config_from_args(PrepareConfig, args)


def _prepare(args: argparse.Namespace) -> None:
    from minigpt.pretrain import prepare

    prepare(prepare_config(args))


def add_prepare_parser(sub) -> None:
    from minigpt.pretrain.config import ERRORS, TOKENIZERS, PrepareConfig

    p = sub.add_parser("prepare", help="tokenize text files, folders or JSONL into token shards")
    # A positional list, which add_field does not make; the help is the field's.
    p.add_argument("inputs", nargs="+", help=field_help(PrepareConfig, "inputs"))
    add_field(p, PrepareConfig, "out_dir", flag="--out").type = out_folder  # --out, as in every other command
    add_field(p, PrepareConfig, "tokenizer", choices=TOKENIZERS)
    for name in ("chars", "val_fraction", "text_field"):
        add_field(p, PrepareConfig, name)
    add_field(p, PrepareConfig, "errors", choices=ERRORS)
    add_field(p, PrepareConfig, "eos")
    add_field(p, PrepareConfig, "shard_tokens")
    add_field(p, PrepareConfig, "num_workers", flag="--workers")  # the shorter name the command always had
    p.set_defaults(func=_prepare)


def _train(args: argparse.Namespace) -> None:
    from minigpt.pretrain.config import load_config
    from minigpt.pretrain.run import pretrain

    config = load_config(args.preset, args.config, args.overrides)
    if args.show_config:
        import json

        print(json.dumps(config.to_dict(), indent=2))
        return
    result = pretrain(config, resume=args.resume, overwrite=args.overwrite)
    if result.sample is not None:
        print(f"--- sample from {result.train.last_checkpoint} ---")
        print(result.sample)


def add_train_parser(sub) -> None:
    from minigpt.pretrain.config import SECTIONS

    p = sub.add_parser(
        "train", allow_abbrev=False, help="pretrain a model (torchrun --nproc_per_node=N -m minigpt train ... for DDP)",
        description="Pretrain from a recipe (--preset), then a TOML/JSON file (--config), then flags "
                    "--section.key=VALUE, one per key of the file's sections (model, train, data, sample); "
                    "--key=VALUE alone where one section has the key. Unset keys keep the recipe's or the "
                    "file's value.",
        epilog=_train_epilog(),
    )
    p.add_argument("--preset", default=None, help="recipe or model preset to start from (default: tiny)")
    p.add_argument("--config", default=None, help="TOML or JSON file with sections model/train/data/sample")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that holds a run, moving that run aside to OUT.old-<time>")
    p.add_argument("--show-config", action="store_true", help="print the effective config as JSON and exit")
    add_threads(p)
    flags = add_overrides(p, SECTIONS, aliases={"data.path": ["--data"]})  # --data: what every command says
    flags["train.out_dir"].type = out_folder
    p.set_defaults(func=_train)


def _export(args: argparse.Namespace) -> None:
    from minigpt.train.export import export_checkpoint

    layout = export_checkpoint(args.run, args.out)
    print(f"wrote {args.out} ({layout} layout)")


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a training checkpoint (sharded or not) as a model folder",
                       description="Consolidate a checkpoint of `minigpt train` (the newest of a run folder, or the "
                                   "checkpoint folder given) into a model folder: Hugging Face's GPT-2 or GPT-Neo "
                                   "layout where one represents the model, minigpt's own otherwise, with the "
                                   "tokenizer's files. A sharded checkpoint (written by every rank of a mesh) is "
                                   "read whole in this process.")
    p.add_argument("run", metavar="RUN|CHECKPOINT", help="run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--out", required=True, help="new folder to write the model into")
    p.set_defaults(func=_export)


def _plot(args: argparse.Namespace) -> None:
    from minigpt.plot import plot_run

    print(plot_run(args.run_dir, args.out, x=args.x))


def add_plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's train/validation loss curves to a PNG")
    p.add_argument("run_dir", help="run folder holding metrics.jsonl")
    p.add_argument("--out", type=out_file, default=None, help="PNG path (default: RUN_DIR/loss.png)")
    p.add_argument("--x", choices=("step", "time"), default="step",
                   help="horizontal axis: update number, or wall-clock seconds of training")
    p.set_defaults(func=_plot)


def _train_epilog() -> str:
    from minigpt.presets import PRESETS
    from minigpt.pretrain.recipes import RECIPES

    return ("recipes (--preset): " + ", ".join(RECIPES) + "; or any model preset with GPT-2's training "
            "recipe: " + ", ".join(p for p in PRESETS if p not in RECIPES) + ".\n"
            "`minigpt train --preset NAME --show-config` prints a recipe in full.")
