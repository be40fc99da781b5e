"""The completion task: prompt/completion pairs, the prompt masked out of the loss.

Its pairs are read here (any file `read_records` reads; a row `minigpt finetune check`
would drop is an error pointing at it), split (the validation file, else a split that
keeps repeated prompts on one side), framed by the special tokens, encoded (prompt +
completion + eos, the loss mask on the completion) and padded or packed. The model is the
backbone itself, trained as a language model with the LM head applied only where there
is a target (`masked_lm_loss`); the final report is the completion loss, its perplexity
and greedy exact match. Classification taught as completion (`minigpt.finetune.as_completion`)
trains through `completion_batches` too.
"""
from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.finetune.check import common_suffix, parse_rows
from minigpt.finetune.config import CompletionData, DataFiles
from minigpt.finetune.data import (
    IGNORE_INDEX, CompletionExample, ShuffledBatches, collate_completion, encode_text, fixed_batches, row_name,
)
from minigpt.finetune.split import report_leakage, split_without_leakage
from minigpt.finetune.task import RunStart, TaskRun
from minigpt.model import GPT
from minigpt.progress import progress_bar

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class PromptCompletion:
    prompt: str
    completion: str
    line: int


def read_prompt_completion(path: str | Path, prompt_column: str = "prompt", completion_column: str = "completion",
                           encoding: str = "utf-8") -> list[PromptCompletion]:
    """Pairs of a prompt/completion file: CSV, TSV, a JSON array or JSONL, with the pair in
    the named columns. Any defect `minigpt finetune check` would drop a row for (bad JSON,
    a missing, non-string or empty field) is a ValueError that names the lines and points
    at the checker; so is anything `minigpt.finetune.records.read_records` refuses."""
    path = Path(path)
    rows, dropped, _ = parse_rows(path, prompt_column=prompt_column, completion_column=completion_column,
                                  encoding=encoding)
    if dropped:
        shown = "; ".join(f"line {d.line}: {d.reason}" for d in dropped[:5])
        more = f" (and {len(dropped) - 5} more)" if len(dropped) > 5 else ""
        raise ValueError(f"{path}: {len(dropped)} unusable rows: {shown}{more}. "
                         f"Run `minigpt finetune check {path} --fix --out FILE.jsonl` to write a cleaned copy")
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return [PromptCompletion(r.prompt, r.completion, r.line) for r in rows]


def pair_split(files: DataFiles, prompt_column: str, completion_column: str
               ) -> tuple[list[PromptCompletion], list[PromptCompletion], int]:
    """(training pairs, validation pairs, validation pairs also in training): the
    validation file, else a split that keeps repeated prompts on one side."""

    def read(path: str) -> list[PromptCompletion]:
        return read_prompt_completion(path, prompt_column, completion_column, files.encoding)

    pairs = read(files.train_file)
    if files.val_file is not None:
        val_pairs = read(files.val_file)
        return pairs, val_pairs, report_leakage(pairs, val_pairs, lambda p: p.prompt, files.train_file,
                                                files.val_file, "prompt")
    pairs, val_pairs = split_without_leakage(pairs, files.val_fraction, files.split_seed, files.train_file,
                                             key=lambda p: 0, group=lambda p: p.prompt, what="prompt")
    log.info("no validation file: held out %d of %d pairs", len(val_pairs), len(pairs) + len(val_pairs))
    return pairs, val_pairs, 0


# ----------------------------------------------------------------------------- encoding
def encode_completion(tokenizer, pair: PromptCompletion, add_eos: bool = True,
                      source: str | Path | None = None) -> CompletionExample:
    """prompt + completion (+ eos), with the loss mask on the completion and eos.

    Prompt and completion are encoded separately, so the boundary between them is a token
    boundary; that is why completions should start with whitespace (the checker says so).
    """
    prompt = encode_text(tokenizer, pair.prompt, source, pair.line)
    completion = encode_text(tokenizer, pair.completion, source, pair.line)
    if add_eos:
        if tokenizer.eos_id is None:
            raise ValueError("this tokenizer has no eos token; pass add_eos=False and end completions "
                             "with a stop sequence instead")
        completion.append(tokenizer.eos_id)
    if not completion:
        raise ValueError(f"{row_name(source, pair.line)}: the completion encodes to no tokens")
    return CompletionExample(tuple(prompt + completion), (False,) * len(prompt) + (True,) * len(completion))


def encode_completions(tokenizer, pairs: Sequence[PromptCompletion], block_size: int,
                       add_eos: bool = True, source: str | Path | None = None) -> list[CompletionExample]:
    """Encode every pair; a pair longer than block_size + 1 tokens is an error listing them
    all (the checker's --fix drops them, and says which)."""
    out = [encode_completion(tokenizer, p, add_eos, source) for p in pairs]
    too_long = [(p.line, len(e.tokens)) for p, e in zip(pairs, out) if len(e.tokens) > block_size + 1]
    if too_long:
        shown = ", ".join(f"line {line} ({n} tokens)" for line, n in too_long[:5])
        raise ValueError(f"{len(too_long)} examples exceed block_size + 1 = {block_size + 1} tokens: {shown}"
                         f"{' ...' if len(too_long) > 5 else ''}. Shorten them, or drop them with "
                         f"`minigpt finetune check FILE --fix`")
    return out


def pack_completions(examples: Sequence[CompletionExample], block_size: int,
                     seed: int = 1337) -> list[CompletionExample]:
    """Concatenate examples (in a seeded random order) into rows of at most block_size + 1
    tokens, so little compute goes to padding.

    Each example ends with eos, so a row reads "a1 ... eos b1 ... eos". Later examples in a
    row can attend to earlier ones (the usual trade of packing); their loss masks are kept,
    so the prompts still carry no loss. Use padding instead for fully isolated examples.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[CompletionExample] = []
    tokens: list[int] = []
    mask: list[bool] = []
    for i in order:
        e = examples[i]
        if tokens and len(tokens) + len(e.tokens) > block_size + 1:
            rows.append(CompletionExample(tuple(tokens), tuple(mask)))
            tokens, mask = [], []
        tokens += e.tokens
        mask += e.mask
    if tokens:
        rows.append(CompletionExample(tuple(tokens), tuple(mask)))
    return rows



# --------------------------------------------------------------------------------- loss
def masked_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`language_model_loss` (mean cross-entropy over targets that are not -100), with the LM
    head applied only at positions that have a target.

    With prompts masked, most positions carry no loss (a classification row has two
    targets, the label word and eos, among ~50 positions), yet the (B, T, V) logits and
    their gradient dominate a small model's step (V = 50257 against n_embd = 32). A
    wrapped model (DDP) or a sharded one (FSDP2 gathers its parameters in its forward's
    hooks; tensor parallelism splits the head) must run through its own forward, so it gets
    the plain loss.
    """
    from minigpt.train.loop import language_model_loss

    if not _runs_its_parts_directly(model):
        return language_model_loss(model, batch)
    targets = batch["targets"]
    x, _, _ = model.hidden(batch["idx"])  # (B, T, C)
    positions = batch.get("target_positions")
    if positions is None:  # a batch not built by `collate_completion`: the mask (a device read)
        keep = targets != IGNORE_INDEX  # (B, T)
        return F.cross_entropy(model.lm_head(x[keep]).float(), targets[keep])
    # The same positions in the same (row-major) order as x[keep], with no device read.
    logits = model.lm_head(x.flatten(0, 1).index_select(0, positions))  # (N, V)
    return F.cross_entropy(logits.float(), targets.flatten().index_select(0, positions))


def _lm_head_positions(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Positions at which `masked_lm_loss` runs the LM head, for MFU (on the loader's CPU batch)."""
    targets = batch["targets"]
    if not _runs_its_parts_directly(model):
        return targets.numel()
    positions = batch.get("target_positions")
    return len(positions) if positions is not None else int((targets != IGNORE_INDEX).sum())


masked_lm_loss.lm_head_positions = _lm_head_positions


def _runs_its_parts_directly(model: nn.Module) -> bool:
    """Whether `masked_lm_loss` may call `model.hidden` and `model.lm_head` itself: a GPT
    whose parameters are whole tensors on this rank (not DTensors of FSDP2 or tensor parallelism)."""
    return isinstance(model, GPT) and not hasattr(model.lm_head.weight, "device_mesh")



# --------------------------------------------------------------------------- evaluation
@dataclass
class CompletionReport:
    loss: float
    """Mean cross-entropy per completion token (eos included), nats."""
    perplexity: float
    tokens: int
    """Completion tokens the loss averages over."""
    exact_match: float | None = None
    """Fraction of greedy completions equal to the reference (whitespace-trimmed, stop cut)."""
    generated: int = 0
    samples: list[dict] = field(default_factory=list)
    """A few (prompt, reference, generated) triples to read."""

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        lines = [f"completion loss {self.loss:.4f} nats/token over {self.tokens} tokens, "
                 f"perplexity {self.perplexity:.2f}"]
        if self.exact_match is not None:
            lines.append(f"exact match {self.exact_match:.3f} on {self.generated} greedy completions")
        for s in self.samples:
            lines += ["", f"prompt:    {s['prompt']!r}", f"reference: {s['reference']!r}", f"generated: {s['generated']!r}"]
        return "\n".join(lines)


@torch.no_grad()
def completion_loss(model, tokenizer, pairs: Sequence[PromptCompletion], batch_size: int = 16,
                    add_eos: bool = True) -> tuple[float, int]:
    """(mean loss per completion token, number of tokens), prompt tokens excluded."""
    examples = encode_completions(tokenizer, pairs, model.config.block_size, add_eos)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        batches = fixed_batches(examples, batch_size, lambda xs: collate_completion(xs, tokenizer.eos_id or 0))
        for batch in progress_bar(batches, math.ceil(len(examples) / batch_size), "loss"):
            idx, targets = batch["idx"].to(device), batch["targets"].to(device)
            logits = model(idx).logits  # (B, T, V)
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / count, count


def evaluate_completion(model, tokenizer, pairs: Sequence[PromptCompletion], *, stop: str = "",
                        max_generate: int = 100, batch_size: int = 16, samples: int = 3,
                        add_eos: bool = True) -> CompletionReport:
    """Loss/perplexity on every pair, and exact match of greedy completions on the first
    `max_generate` pairs (generation is the slow part; 0 skips it)."""
    from minigpt.generate import generate_text

    loss, tokens = completion_loss(model, tokenizer, pairs, batch_size, add_eos)
    report = CompletionReport(loss, math.exp(min(loss, 80.0)), tokens)
    chosen = list(pairs[:max_generate])
    if not chosen:
        return report
    stops = [stop] if stop else []
    hits = 0
    for i in progress_bar(range(0, len(chosen), batch_size), math.ceil(len(chosen) / batch_size), "generate"):
        part = chosen[i : i + batch_size]
        budget = max(len(tokenizer.encode(p.completion)) for p in part) + 4
        budget = min(budget, model.config.block_size - max(len(tokenizer.encode(p.prompt)) for p in part))
        outputs = generate_text(model, tokenizer, [p.prompt for p in part], max(budget, 1), stop=stops, temperature=0)
        for p, out in zip(part, outputs):
            reference = p.completion[: -len(stop)] if stop and p.completion.endswith(stop) else p.completion
            hits += out.strip() == reference.strip()
            if len(report.samples) < samples:
                report.samples.append({"prompt": p.prompt, "reference": reference, "generated": out})
    report.exact_match = hits / len(chosen)
    report.generated = len(chosen)
    return report



# ---------------------------------------------------------------------------------- run
@dataclass(frozen=True)
class CompletionBatches:
    """Encoded training and validation pairs, batched for the loop."""

    train: ShuffledBatches
    eval: Callable[[], object]
    """A fresh pass over the validation batches."""
    separator: str
    """The text every training prompt ends with ("" if none), put after a prompt to sample."""
    stop: str
    """The text every training completion ends with ("" if none), where sampling stops."""
    details: dict
    """train_pairs, val_pairs and packed_rows (None without packing)."""


def completion_batches(pairs: Sequence[PromptCompletion], val_pairs: Sequence[PromptCompletion], start: RunStart,
                       files: DataFiles, packing: bool, add_eos: bool) -> CompletionBatches:
    """Encode framed pairs (a pair beyond block_size + 1 tokens is an error), pack the
    training rows if asked, and batch them with the tokenizer's pad (else eos)."""
    block_size, tokenizer = start.backbone.config.block_size, start.tokenizer
    train_examples = encode_completions(tokenizer, pairs, block_size, add_eos, files.train_file)
    val_examples = encode_completions(tokenizer, val_pairs, block_size, add_eos, files.val_source)
    if packing:
        rows = pack_completions(train_examples, block_size, files.split_seed)
        log.info("packed %d examples into %d rows of up to %d tokens", len(train_examples), len(rows), block_size + 1)
        train_examples = rows
    pad = getattr(tokenizer, "pad_id", None)
    pad = pad if pad is not None else tokenizer.eos_id or 0

    def collate(examples):
        return collate_completion(examples, pad)

    return CompletionBatches(start.batches(train_examples, collate),
                             lambda: fixed_batches(val_examples, start.eval_batch_size, collate),
                             common_suffix([p.prompt for p in pairs]), common_suffix([p.completion for p in pairs]),
                             {"train_pairs": len(pairs), "val_pairs": len(val_pairs),
                              "packed_rows": len(train_examples) if packing else None})


def language_model_run(batches: CompletionBatches, start: RunStart, details: dict,
                       evaluate: Callable[[nn.Module], object], extra_eval=None) -> TaskRun:
    """The run of the backbone trained as a language model on framed pairs (the prompt
    masked), the completion task's and classification-as-completion's; its folder is a
    completion model."""
    details = {**batches.details, **details, **start.choose_trainable(start.backbone, ())}
    return TaskRun(
        model=start.backbone,
        train_batches=batches.train,
        eval_batches=batches.eval,
        loss_fn=masked_lm_loss,
        extra_eval=extra_eval,
        evaluate=evaluate,
        meta=start.meta("completion", details, separator=batches.separator, stop=batches.stop,
                        bos=start.tokens.bos),
        details=details,
    )


def completion_run(data: CompletionData, start: RunStart) -> TaskRun:
    """The backbone trained on the prompt/completion pairs of `data`."""
    pairs, val_pairs, leaks = pair_split(data.files, data.prompt_column, data.completion_column)
    frame = start.tokens.frame
    pairs = [PromptCompletion(frame(p.prompt), p.completion, p.line) for p in pairs]
    val_pairs = [PromptCompletion(frame(p.prompt), p.completion, p.line) for p in val_pairs]
    batches = completion_batches(pairs, val_pairs, start, data.files, data.packing, data.add_eos)

    def evaluate(model: nn.Module) -> CompletionReport:
        return evaluate_completion(model, start.tokenizer, val_pairs, stop=batches.stop,
                                   max_generate=data.max_generate, batch_size=start.eval_batch_size,
                                   add_eos=data.add_eos)

    return language_model_run(batches, start, {"val_pairs_in_train": leaks}, evaluate)
