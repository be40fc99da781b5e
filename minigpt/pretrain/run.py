"""Pretraining entry point: prepare or open the data, build the model, train it with the
shared loop (`minigpt.train.loop.train`), and sample from it.

The config comes from `minigpt.pretrain.config.load_config` (recipe + file + overrides).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt.device import check_device, memory_bytes
from minigpt.files import write_text
from minigpt.pretrain.config import PrepareConfig, PretrainConfig
from minigpt.pretrain.dataset import FixedWindows, RandomWindows, TokenSplit
from minigpt.pretrain.prepare import prepare, stale_reason
from minigpt.pretrain.sources import check_outside_inputs
from minigpt.train import distributed as dist_
from minigpt.train import runfolder
from minigpt.train.config import TrainConfig
from minigpt.train.loop import train
from minigpt.train.state import TrainResult

logger = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    """What `pretrain` returns."""

    train: TrainResult
    run_dir: Path
    data_dir: Path
    sample: str | None


def _data_folder(config: PretrainConfig, info: dist_.DistInfo) -> Path:
    """A prepared dataset folder for config.data.path (preparing raw text into out_dir/data)."""
    data = config.data
    if data.path is not None and (Path(data.path) / "meta.json").is_file():
        return Path(data.path)
    if data.path is None:
        from minigpt.pretrain.corpora import tiny_shakespeare

        inputs = (str(tiny_shakespeare()),) if info.is_main else ()
    else:
        inputs = (data.path,)
    folder = Path(config.train.out_dir) / "data"
    if info.is_main:
        prep = PrepareConfig(inputs=inputs, out_dir=str(folder), tokenizer=data.tokenizer,
                             val_fraction=data.val_fraction, text_field=data.text_field, errors=data.errors,
                             progress=config.train.progress)
        if not _already_prepared(folder, prep):
            prepare(prep)
    dist_.barrier()
    return folder


def _already_prepared(folder: Path, prep: PrepareConfig) -> bool:
    """Whether `folder` holds a preparation of exactly these inputs (same bytes, by content
    hash); when it holds another, say why it is prepared again."""
    reason = stale_reason(folder, prep)
    if reason is not None and (folder / "meta.json").is_file():
        logger.info("preparing %s again: %s", folder, reason)
    return reason is None


def pretrain(config: PretrainConfig, resume: bool = False, overwrite: bool = False) -> PretrainResult:
    """Prepare or open the data, build the model, train it, and sample from it (rank 0).

    The run folder is claimed first (minigpt.train.runfolder): a folder that holds another
    run is refused unless `resume` or `overwrite` (which moves the old run aside). Every
    rank leaves the process group when training ends, also on an error; the sample is
    drawn afterwards on rank 0 alone, from the final checkpoint when the model is sharded.

    Raises ValueError when the data's vocabulary does not fit the model, and whatever
    `prepare` and `train` raise.
    """
    check_device(config.train.device)
    check_memory_fits(config)
    run_dir = Path(config.train.out_dir)
    if config.data.path is not None and not (Path(config.data.path) / "meta.json").is_file():
        check_outside_inputs((config.data.path,), run_dir, "train.out_dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"train.out_dir={str(run_dir)!r} is a file; the run folder must be a folder (choose another "
                         f"--out-dir)")
    with dist_.process_group(config.train.device) as info:
        with runfolder.claim(run_dir, resume=resume, overwrite=overwrite, is_main=info.is_main) as folder:
            result, model, tokenizer, data_dir = _pretrain(config, info, folder)
    text = None
    if info.is_main and config.sample.tokens > 0:
        from minigpt.generate import generate_text

        if dist_.resolve_parallel(config.train.parallel, info, config.train.uses_mesh) == "fsdp":
            model = _trained_model(result.last_checkpoint, config.model)  # sharded in memory: read the checkpoint
        model.eval()
        s = config.sample
        text = s.prompt + generate_text(model, tokenizer, s.prompt, s.tokens, temperature=s.temperature,
                                        top_k=s.top_k, seed=s.seed)[0]
    return PretrainResult(train=result, run_dir=run_dir, data_dir=data_dir, sample=text)


def _trained_model(checkpoint: Path, model_config) -> torch.nn.Module:
    """The model of a checkpoint written on the mesh path: a gathered model folder, or
    sharded (read whole in this process, `checkpoint.consolidate`)."""
    from minigpt.model import GPT
    from minigpt.train.checkpoint import consolidate, is_sharded

    if not is_sharded(checkpoint):
        return GPT.from_pretrained(checkpoint)
    model = GPT(model_config)
    consolidate(checkpoint, model)
    return model


def warn_eval_cost(tc: TrainConfig, block_size: int, val_tokens: int) -> None:
    """Warn when `eval_steps` is out of proportion: each evaluation draws eval_steps random
    windows, so reading more tokens than the validation split holds scores the same text
    again (no better an estimate, only slower), and evaluations that together cost more than
    the training steps (an update is about 3 forward passes) make a run mostly evaluation.
    Not an error: a user may want it, but should not get it without a word."""
    per_eval = tc.eval_steps * tc.batch_size * block_size
    enough = max(1, -(-val_tokens // (tc.batch_size * block_size)))
    if per_eval > 2 * val_tokens and enough < tc.eval_steps:
        logger.warning("train.eval_steps=%d reads %s tokens per evaluation, %.0fx the validation split's %s: "
                       "the same text is scored again and again, which only makes evaluation slower; "
                       "--train.eval_steps=%d reads it about once", tc.eval_steps, f"{per_eval:,}",
                       per_eval / max(1, val_tokens), f"{val_tokens:,}", enough)
    evaluations = tc.max_steps // tc.eval_interval + (tc.max_steps % tc.eval_interval != 0)
    if evaluations * tc.eval_steps > 3 * tc.max_steps * tc.grad_accum:
        logger.warning("evaluation will take longer than training: %d evaluations of %d batches (eval_interval=%d) "
                       "against %d updates; lower --train.eval_steps or raise --train.eval_interval",
                       evaluations, tc.eval_steps, tc.eval_interval, tc.max_steps)


def check_memory_fits(config: PretrainConfig) -> None:
    """Refuse, before anything is prepared or built, a run whose smallest possible training
    step (`counts.training_bytes_lower_bound`) exceeds the device's whole memory: it would
    only end, minutes later, in an allocator traceback. Runs that may fit are let through."""
    from minigpt.counts import training_bytes_lower_bound

    total = memory_bytes(config.train.device)
    if total is None:
        return
    m, tc = config.model, config.train
    need = training_bytes_lower_bound(m, tc.batch_size)
    if need <= total:
        return
    gib = 1 << 30
    per_sequence = max(1, training_bytes_lower_bound(m, 1) - training_bytes_lower_bound(m, 0))
    fits = (total - training_bytes_lower_bound(m, 0)) // per_sequence
    hint = (f"--train.batch_size={fits} or lower (with --train.grad_accum to keep the batch)" if fits >= 1
            else "a smaller --model.block_size, --model.n_embd or --model.n_layer")
    raise ValueError(
        f"model.block_size={m.block_size} with train.batch_size={tc.batch_size} (n_layer={m.n_layer}, "
        f"n_embd={m.n_embd}, vocab_size={m.vocab_size}) needs at least {need / gib:.1f} GiB to train, more than "
        f"the {total / gib:.1f} GiB of memory of device {tc.device!r}; try {hint}")


def _pretrain(config: PretrainConfig, info: dist_.DistInfo,
              folder: runfolder.ClaimedFolder) -> tuple[TrainResult, torch.nn.Module, object, Path]:
    """(train result, trained model, tokenizer, data folder): everything but the sample."""
    run_dir = Path(config.train.out_dir)
    data_dir = _data_folder(config, info)
    train_split = TokenSplit(data_dir, "train", verify=config.data.verify)
    val_split = TokenSplit(data_dir, "val", verify=config.data.verify)
    if train_split.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"the data's tokenizer has {train_split.vocab_size} ids but model.vocab_size={config.model.vocab_size}; "
            f"set --model.vocab_size={train_split.vocab_size}"
            + (" (or start from --preset tiny-bpe, a small recipe with GPT-2's vocabulary)"
               if train_split.vocab_size == 50257 else "")
        )
    block, tc = config.model.block_size, config.train
    share = info.with_tp(tc.tp)  # a tensor-parallel group reads one share of the batch
    batches = RandomWindows(train_split, block, tc.batch_size, seed=tc.seed, rank=share.dp_rank,
                            world_size=share.dp_size)
    evals = FixedWindows(val_split, block, tc.batch_size, tc.eval_steps, seed=config.data.eval_seed,
                         rank=share.dp_rank, world_size=share.dp_size)
    if info.is_main:
        warn_eval_cost(tc, block, len(val_split))
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "run_config.json", json.dumps(config.to_dict(), indent=2) + "\n")

    from minigpt.model import GPT
    from minigpt.tokenizer import tokenizer_files, tokenizer_from_dict

    torch.manual_seed(tc.seed)  # the initial weights
    if dist_.resolve_parallel(tc.parallel, info, tc.uses_mesh) == "fsdp":
        with torch.device("meta"):  # never whole: each rank fills its shards (minigpt.train.materialize)
            model = GPT(config.model)
    else:
        model = GPT(config.model)
    tokenizer = tokenizer_from_dict(train_split.tokenizer)
    if config.sample.tokens > 0:  # find out now, not after the whole run
        try:
            tokenizer.encode(config.sample.prompt)
        except ValueError as err:
            raise ValueError(f"sample.prompt={config.sample.prompt!r} cannot be encoded by the data's tokenizer ({err}); "
                             f"change --sample.prompt or set --sample.tokens=0") from None
    meta = train_split.meta
    run_metadata = {"model": config.model.to_dict(),
                    "data": {"tokenizer": meta["tokenizer"], "dtype": meta["dtype"],
                             "train_tokens": meta["splits"]["train"]["tokens"],
                             "val_tokens": meta["splits"]["val"]["tokens"]}}
    result = train(model, tc, batches, eval_batches=evals, folder=folder, run_metadata=run_metadata,
                   checkpoint_files=tokenizer_files(tokenizer, config.model.block_size), init_seed=tc.seed)
    return result, model, tokenizer, data_dir
