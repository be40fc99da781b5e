"""Run tasks on a model: one function per task type, then the table and the output files.

`evaluate_examples` scores one task in memory; `run_eval` is what `minigpt eval` calls: it
loads a model folder, evaluates each task file and writes results.json, examples.jsonl
(one line per example, with each choice's log-likelihood, so any number can be audited)
and results.md.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minigpt.evaluation.metrics import argmax, mean_stderr, token_f1
from minigpt.evaluation.prompts import PromptFormat, build_prompts
from minigpt.evaluation.scoring import score_continuations
from minigpt.evaluation.tasks import Example, Task, read_examples, read_task
from minigpt.files import EVAL_AGAIN, write_text, writing
from minigpt.typed import check_count

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    task: str
    kind: str
    shots: int
    n: int
    metrics: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float | None] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    """One record per example (see `examples.jsonl`)."""

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "examples"}


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt; an empty prompt is the end-of-text token, as in the harness."""
    ids = tokenizer.encode(text)
    if ids:
        return ids
    return [_eos(tokenizer)]


def _eos(tokenizer) -> int:
    if getattr(tokenizer, "eos_id", None) is None:
        raise ValueError("an empty prompt (zero-shot with an empty context) needs a tokenizer with an eos token")
    return tokenizer.eos_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness encodes a pair for scoring.

    Whitespace that ends the context moves to the front of the continuation (so "Answer: "
    + "yes" scores the token " yes", not " " then "yes"); the pair is encoded whole and the
    continuation is what follows the context's own encoding. An empty context is the
    end-of-text token (or, when the continuation starts with it, that first token).
    """
    if not context:
        cont = tokenizer.encode(continuation)
        eos = _eos(tokenizer)
        return ([eos], cont) if not cont or cont[0] != eos else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def _encode_choices(tokenizer, context: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """One request: the context's ids and each continuation's, by `encode_pair`. Moving the
    context's trailing whitespace changes the context alike for every continuation."""
    pairs = [encode_pair(tokenizer, context, c) for c in continuations]
    return pairs[0][0], [cont for _, cont in pairs]


def _mean_into(result: EvalResult, name: str, values: Sequence[float]) -> None:
    result.metrics[name], result.stderr[name] = mean_stderr(values)


def _multiple_choice(model, tokenizer, examples, prompts, fmt, result: EvalResult, **kw) -> None:
    requests = [_encode_choices(tokenizer, p, fmt.continuations(e)) for p, e in zip(prompts, examples)]
    scored = score_continuations(model, requests, desc=result.task, **kw)
    uncond: dict[str, float] = {}
    if fmt.unconditional_prompt is not None:
        # One score per distinct continuation: a label set (SST-2's two words) costs two.
        distinct = sorted({c for e in examples for c in fmt.continuations(e)})
        totals = score_continuations(model, [_encode_choices(tokenizer, fmt.unconditional_prompt, distinct)], **kw)[0]
        uncond = {c: s.total for c, s in zip(distinct, totals)}
    for prompt, e, (ctx, conts), scores in zip(prompts, examples, requests, scored):
        ll = [s.total for s in scores]
        record = {"line": e.line, "prompt": prompt, "choices": list(e.choices), "label": e.label,
                  "loglikelihoods": ll, "tokens": [len(c) for c in conts], "context_tokens": len(ctx)}
        preds = {"acc": argmax(ll), "acc_norm": argmax([v / len(c) for v, c in zip(ll, e.choices)])}
        if uncond:
            record["unconditional_loglikelihoods"] = [uncond[c] for c in fmt.continuations(e)]
            preds["acc_uncond"] = argmax([v - u for v, u in zip(ll, record["unconditional_loglikelihoods"])])
        record["predictions"] = preds
        record.update({name: float(p == e.label) for name, p in preds.items()})
        result.examples.append(record)
    for name in result.examples[0]["predictions"]:
        _mean_into(result, name, [r[name] for r in result.examples])


def _cloze(model, tokenizer, examples, prompts, fmt, result: EvalResult, **kw) -> None:
    requests = [_encode_choices(tokenizer, p, [e.target]) for p, e in zip(prompts, examples)]
    scored = score_continuations(model, requests, desc=result.task, **kw)
    for prompt, e, (_, (target,)), (s,) in zip(prompts, examples, requests, scored):
        result.examples.append({"line": e.line, "prompt": prompt, "target": e.target, "tokens": len(target),
                                "loglikelihood": s.total, "token_logprobs": list(s.logprobs),
                                "acc": float(s.greedy)})
    _mean_into(result, "acc", [r["acc"] for r in result.examples])
    _mean_into(result, "loglikelihood", [r["loglikelihood"] for r in result.examples])
    result.metrics["perplexity"] = float(torch.tensor(-result.metrics["loglikelihood"]).exp())
    result.stderr["perplexity"] = None


@torch.no_grad()
def _free_form(model, tokenizer, examples, prompts, fmt, result: EvalResult, *, batch_size: int = 16,
               progress: bool = False, use_cache: bool = True) -> None:
    from minigpt.generate import generate

    # Room for the longest reference and a few tokens more: a longer answer is wrong anyway.
    budget = max(len(tokenizer.encode(e.completion)) for e in examples) + 8
    budget = min(budget, model.config.block_size // 2)
    stop = fmt.stop
    starts = range(0, len(examples), batch_size)
    for s in tqdm(starts, desc=result.task, disable=not progress, unit="batch"):
        part = list(zip(prompts[s : s + batch_size], examples[s : s + batch_size]))
        rows = [_encode(tokenizer, p)[-(model.config.block_size - budget):] for p, _ in part]
        outputs = generate(model, rows, budget, temperature=0, eos_id=getattr(tokenizer, "eos_id", None),
                           use_cache=use_cache)
        for (prompt, e), out in zip(part, outputs):
            text = tokenizer.decode(out).split(stop)[0] if stop else tokenizer.decode(out)
            result.examples.append({"line": e.line, "prompt": prompt, "reference": e.completion, "generated": text,
                                    "exact_match": float(text.strip() == e.completion.strip()),
                                    "f1": token_f1(text, e.completion)})
    _mean_into(result, "exact_match", [r["exact_match"] for r in result.examples])
    _mean_into(result, "f1", [r["f1"] for r in result.examples])


_RUNNERS = {"multiple_choice": _multiple_choice, "cloze": _cloze, "free_form": _free_form}


def evaluate_examples(model, tokenizer, task: Task, *, shots: int = 0, demos: Sequence[Example] | None = None,
                      fixed_demos: Sequence[Example] | None = None, seed: int = 1337,
                      fmt: PromptFormat = PromptFormat(), batch_size: int = 16, use_cache: bool = True,
                      progress: bool = False) -> EvalResult:
    """Evaluate one task with `shots` demonstrations per example.

    demos: the pool to draw demonstrations from (default: the task's other examples);
    fixed_demos: the same demonstrations for every example instead (the `fewshot` command).
    Multiple choice gives acc, acc_norm and acc_uncond (see `metrics`); cloze gives acc
    (greedy exact match of the last word), its mean log-likelihood and the perplexity;
    free-form gives exact_match and token F1 of a greedy completion cut at `fmt.stop`.
    """
    check_count("batch_size", batch_size, 1, "it counts examples per forward pass")
    check_count("shots", shots, 0, "0 evaluates zero-shot")
    if not task.examples:
        raise ValueError(f"task {task.name!r} has no examples")
    prompts = build_prompts(task.examples, shots, seed, fmt, demos=demos, fixed=fixed_demos)
    result = EvalResult(task.name, task.kind, len(fixed_demos) if fixed_demos is not None else shots,
                        len(task.examples))
    _RUNNERS[task.kind](model, tokenizer, list(task.examples), prompts, fmt, result, batch_size=batch_size,
                        progress=progress, use_cache=use_cache)
    return result


# -------------------------------------------------------------------------------- output
def table_rows(results: Sequence[EvalResult]) -> list[tuple[str, str, float, float | None, int]]:
    return [(r.task, m, v, r.stderr.get(m), r.n) for r in results for m, v in r.metrics.items()]


def format_table(results: Sequence[EvalResult], markdown: bool = False) -> str:
    """The results as a table: task, metric, value, stderr, n."""
    def number(v: float | None) -> str:
        return "" if v is None else f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"

    head = ("task", "shots", "metric", "value", "stderr", "n")
    body = [(r.task, str(r.shots), m, number(v), number(r.stderr.get(m)), str(r.n))
            for r in results for m, v in r.metrics.items()]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in (head, *body))


def write_results(results: Sequence[EvalResult], out_dir: str | Path, extra: dict | None = None) -> Path:
    """results.json (metrics and stderr per task), examples.jsonl and results.md."""
    out = Path(out_dir)
    summary = {**(extra or {}), "results": [r.summary() for r in results]}
    examples = "".join(json.dumps({"task": r.task, **record}, ensure_ascii=False) + "\n"
                       for r in results for record in r.examples)
    with writing(out, EVAL_AGAIN):
        out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.json", json.dumps(summary, indent=2) + "\n", EVAL_AGAIN)
    write_text(out / "examples.jsonl", examples, EVAL_AGAIN)
    write_text(out / "results.md", format_table(results, markdown=True) + "\n", EVAL_AGAIN)
    return out


def run_eval(task_files: Sequence[str | Path], model_dir: str | Path, *, shots: int = 0,
             demos: str | Path | None = None, fewshot_file: str | Path | None = None, limit: int | None = None,
             out_dir: str | Path | None = None, seed: int = 1337, device: str = "cpu", batch_size: int = 16,
             backend: str = "sdpa", fmt: PromptFormat = PromptFormat(), progress: bool = True) -> list[EvalResult]:
    """Load a model folder and evaluate each task file (its first `limit` examples) with
    `shots` demonstrations: drawn per example from `demos` (default: the file's other
    examples), or with `fewshot_file` the first `shots` rows of that file, in order, the
    same for every example (lm-evaluation-harness's `first_n` sampler over a fixed split)."""
    from minigpt.model import GPT
    from minigpt.tokenizer import load_tokenizer

    check_count("batch_size", batch_size, 1, "it counts examples per forward pass")
    fixed = _first_demonstrations(fewshot_file, shots, demos) if fewshot_file is not None else None
    model = GPT.from_pretrained(model_dir, backend=backend).to(device)
    tokenizer = load_tokenizer(model_dir)
    pool = read_examples(demos) if demos is not None else None
    results = []
    for path in task_files:
        task = read_task(path, limit)
        given = pool or fixed
        if given is not None and type(given[0]) is not type(task.examples[0]):
            flag = f"--demos {demos}" if pool else f"--fewshot-file {fewshot_file}"
            raise ValueError(f"{flag} holds {type(given[0]).__name__} rows but {path} holds "
                             f"{type(task.examples[0]).__name__} rows; give demonstrations of the same type")
        results.append(evaluate_examples(model, tokenizer, task, shots=shots, demos=pool, fixed_demos=fixed,
                                         seed=seed, fmt=fmt, batch_size=batch_size, progress=progress))
        log.info("%s: %s", task.name, ", ".join(f"{k}={v:.4f}" for k, v in results[-1].metrics.items()))
    if out_dir is not None:
        write_results(results, out_dir, {"model": str(model_dir), "shots": shots, "seed": seed,
                                         "demos": None if demos is None else str(demos),
                                         "fewshot_file": None if fewshot_file is None else str(fewshot_file),
                                         "limit": limit, "separator": fmt.separator,
                                         "target_delimiter": fmt.target_delimiter,
                                         "unconditional_prompt": fmt.unconditional_prompt, "stop": fmt.stop})
    return results


def _first_demonstrations(path: str | Path, shots: int, demos: str | Path | None) -> list[Example]:
    """The first `shots` examples of `path`: fixed demonstrations, in the file's order."""
    if demos is not None:
        raise ValueError("--fewshot-file and --demos both give demonstrations; use one (--fewshot-file: the same "
                         "first K rows for every example; --demos: K drawn per example)")
    if shots < 1:
        raise ValueError(f"--fewshot-file takes its first --shots rows as demonstrations; got --shots {shots} "
                         f"(give --shots K, K >= 1)")
    rows = read_examples(path)
    if len(rows) < shots:
        raise ValueError(f"--fewshot-file {path} holds {len(rows)} examples, fewer than --shots {shots}; "
                         f"lower --shots or add demonstrations")
    return rows[:shots]
