"""The `minigpt` command. Each subcommand parses its arguments and calls one library function."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from minigpt.cli.common import canonical
from minigpt.cli.evaluate import add_eval_parser, add_evaluate_parser, add_fewshot_parser, add_predict_parser
from minigpt.cli.finetune import add_finetune_parser
from minigpt.cli.inside import (
    add_attention_map_parser, add_heads_parser, add_inspect_parser, add_logit_lens_parser, add_patch_parser,
    add_sample_parser,
)
from minigpt.cli.pretrain import add_export_parser, add_plot_parser, add_prepare_parser, add_train_parser
from minigpt.cli.serve import add_serve_parser
from minigpt.device import check_device
from minigpt.runconfig import valid_keys
from minigpt.typed import BOOL_WORDS

# One module per group of subcommands (pretrain, finetune, evaluate, inside: running and
# looking inside a model), each adding its parsers; a new subcommand goes into its group's
# module and `build_parser` below. The docstring above is the command's --help description.


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default, and keeps the epilog's line breaks. The usage
    line leaves out a run config's many `--section.key` flags (the help lists them)."""

    def add_usage(self, usage, actions, groups, prefix=None) -> None:
        super().add_usage(usage, [a for a in actions if a.dest != "overrides"], groups, prefix)

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


def _resolve_models(args: argparse.Namespace) -> None:
    """Point every model argument at a model folder (`minigpt.model_dir.resolve_model_dir`):
    a training run means its best checkpoint, a fine-tuning run its exported model."""
    from minigpt.model_dir import resolve_model_dir

    if getattr(args, "model", None) is not None:
        args.model_given = args.model  # the name a user knows it by (`minigpt serve` serves it as that)
        args.model = str(resolve_model_dir(args.model))
    if args.command == "inspect" and Path(args.source).is_dir():
        args.source = str(resolve_model_dir(args.source))


def _subcommand_parser(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.ArgumentParser:
    """The parser of the innermost subcommand named in `argv` (its usage is the one to show)."""
    words = sys.argv[1:] if argv is None else argv
    current = parser
    for word in words:
        actions = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if actions and word in actions[0].choices:
            current = actions[0].choices[word]
    return current


def _respelled(parser: argparse.ArgumentParser, argv: list[str] | None) -> list[str]:
    """`argv` with each flag in the spelling the subcommand's parser knows: a flag written
    with underscores or dashes (`--lora_rank`, `--max-steps`) as the flag of that name, and a
    true/false flag given a word (`--progress=false`) as `--progress` or `--no-progress`; a
    word that is no boolean is a usage error that names the two spellings."""
    words = sys.argv[1:] if argv is None else list(argv)
    command = _subcommand_parser(parser, words)
    actions = command._option_string_actions
    spelled = {canonical(flag): flag for flag in actions}
    out = []
    for word in words:
        flag, sep, value = word.partition("=")
        if not flag.startswith("--") or canonical(flag) not in spelled:
            out.append(word)
            continue
        flag = flag if flag in actions else spelled[canonical(flag)]
        if sep and isinstance(actions[flag], argparse.BooleanOptionalAction):
            on = "--" + flag.removeprefix("--").removeprefix("no-")
            if value.strip().lower() not in BOOL_WORDS:
                command.error(f"{word}: {on} is true/false; write {on} or --no-{on[2:]}")
            negate = BOOL_WORDS[value.strip().lower()] == flag.startswith("--no-")
            out.append(f"--no-{on[2:]}" if negate else on)
        else:
            out.append(flag + sep + value)
    return out


def _suggestions(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """'; did you mean --temperature?' for each unknown flag close to one the command shows."""
    import difflib

    known = [o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings if o.startswith("--")]
    hints = []
    for word in extra:
        flag = word.split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6) or \
            difflib.get_close_matches(flag.replace("_", "-"), known, n=1, cutoff=0.6)
        if close:
            hints.append(f"{flag}: did you mean {close[0]}?")
    return ("; " + "; ".join(hints)) if hints else ""


def _set_threads(threads: int | None) -> None:
    """torch's CPU threads for this command; on a busy machine fewer can be faster."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads={threads} must be at least 1 (leave it out for torch's default, one per core)")
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
    add_export_parser(sub)
    add_finetune_parser(sub)
    add_fewshot_parser(sub)
    add_evaluate_parser(sub)
    add_predict_parser(sub)
    add_eval_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = _respelled(parser, argv)
    args, extra = parser.parse_known_args(argv)  # known: to add "did you mean" to argparse's error
    if extra:
        command = _subcommand_parser(parser, argv)
        hints = _suggestions(command, extra)
        if not hints and getattr(args, "override_sections", None):  # like an unknown key in a config file
            hints = f"; valid keys (--section.key=VALUE) are {valid_keys(args.override_sections)}"
        command.error(f"unrecognized arguments: {' '.join(extra)}{hints}")
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
