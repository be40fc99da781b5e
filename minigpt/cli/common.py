"""What several subcommands share: the help of a model argument and the options for data
files and CPU threads."""
from __future__ import annotations

import argparse

MODEL_HELP = ("a model folder (Hugging Face GPT-2/GPT-Neo layout or minigpt's), a training run folder (its best "
              "checkpoint) or a fine-tuning run folder (its exported model)")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (None: torch's default, one per core); on a busy machine fewer "
                        "can be faster")


def add_columns(p) -> None:
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--merge-label-case", action="store_true",
                   help="treat labels that differ only by case or surrounding whitespace as one class "
                        "(default: an error listing the spellings)")


def add_pair_columns(p) -> None:
    p.add_argument("--prompt-column", default="prompt", help="column (or JSON field) holding the prompt")
    p.add_argument("--completion-column", default="completion", help="column (or JSON field) holding the completion")


def add_encoding(p) -> None:
    p.add_argument("--encoding", default="utf-8",
                   help="text encoding of the data files, e.g. latin-1 or cp1252 (a UTF-8 BOM is always dropped)")
