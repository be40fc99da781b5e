"""`minigpt eval` against lm-evaluation-harness on the same model, task file and demonstrations.

The peer is lm-evaluation-harness (`lm_eval.simple_evaluate` with its `HFLM` on a model
folder saved by `transformers`), given a local multiple-choice task in YAML whose fixed
few-shot split is read with the `first_n` sampler; minigpt runs `minigpt eval` on the same
folder with `--fewshot-file`. The model is a tiny random GPT-2 with GPT-2's own tokenizer
(the BPE is what makes whitespace matter) and a 64-token window, so that 2-shot prompts
are longer than the window and are cut.

Compared per example: each choice's log-likelihood (float32, within 1e-4 nats; the two sum
the same log-softmax values over up to 64 positions), and acc and acc_norm exactly. The
rows include contexts that end in a space or a newline (the harness moves that whitespace
into the continuation) and choices of different token lengths (the harness cuts the context
for each choice separately).
"""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import transformers

from minigpt.cli import main
from tests.helpers import DATA, need_file, use_tiktoken_cache

lm_eval = pytest.importorskip("lm_eval")  # an extra of [test] (the README's test command); the GPU machine skips
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

LOGLIKELIHOOD_ATOL = 1e-4
"""float32: nats, on sums over up to block_size positions."""
BLOCK = 64
TASK = "minigpt_peer_mc"


def rows() -> list[dict]:
    ends = ["", " ", "\n", "  "]  # nothing, a space, a newline, two spaces
    questions = ["Is the sky blue", "Do cats bark at the moon every night", "Is water wet",
                 "Would you rather read a long book about the history of the river that runs through the old town, "
                 "from the first mills on its banks to the bridges, floods and festivals of the last two centuries",
                 "Can fish climb", "Is two more than one", "Does the sun rise in the west", "Are apples fruit"]
    choices = [["yes", "no", "maybe, it depends on the day"], ["never", "always", "sometimes"],
               ["yes", "no", "only when it rains hard"], ["a", "b c", "d e f"]]
    return [{"context": f"Q: {q}? A:{ends[i % 4]}", "choices": choices[i % 4], "label": i % 3}
            for i, q in enumerate(questions)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("peer"))


def make_workspace(folder):
    """The model folder, the task and demonstration files, and the harness's task YAML."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=BLOCK)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder / "model")
    bpe = need_file(DATA / "gpt2_bpe")
    shutil.copy(bpe / "encoder.json", folder / "model" / "vocab.json")
    shutil.copy(bpe / "vocab.bpe", folder / "model" / "merges.txt")
    (folder / "model" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": BLOCK}))
    examples = rows()
    write_jsonl(folder / "test.jsonl", examples)
    write_jsonl(folder / "train.jsonl", examples[::-1])  # the fixed demonstrations, in this order
    (folder / "tasks").mkdir()
    (folder / "tasks" / "task.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "test.jsonl"}
    train: {folder / "train.jsonl"}
test_split: test
fewshot_split: train
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return folder


def write_jsonl(path, items) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))


def harness(folder, shots: int, monkeypatch) -> list[dict]:
    """lm-evaluation-harness's per-example records, in document order."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(folder / "datasets_cache"))
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=str(folder / "model"), batch_size=4, device="cpu")
    assert lm.max_length == BLOCK
    out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], num_fewshot=shots, log_samples=True,
                                  task_manager=TaskManager(include_path=str(folder / "tasks")))
    return sorted(out["samples"][TASK], key=lambda s: s["doc_id"])


def ours(folder, shots: int, tmp_path, monkeypatch) -> list[dict]:
    """minigpt eval's per-example records (examples.jsonl), in file order."""
    use_tiktoken_cache(monkeypatch)
    out = tmp_path / f"eval{shots}"
    fewshot = ["--fewshot-file", str(folder / "train.jsonl"), "--shots", str(shots)] if shots else []
    main(["eval", str(folder / "test.jsonl"), "--model", str(folder / "model"), "--out", str(out),
          "--unconditional-prompt", "", "--threads", "1", *fewshot])
    return [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("shots", [0, 2])
def test_loglikelihoods_and_accuracies_equal_the_harness(workspace, shots, tmp_path, monkeypatch):
    peer = harness(workspace, shots, monkeypatch)
    mine = ours(workspace, shots, tmp_path, monkeypatch)
    assert len(peer) == len(mine) == len(rows())
    worst = 0.0
    for theirs, record in zip(peer, mine):
        expected = [ll for ll, _ in theirs["filtered_resps"]]
        assert theirs["arguments"][0][0] == record["prompt"]  # the same prompt, demonstrations and all
        worst = max(worst, *(abs(a - b) for a, b in zip(record["loglikelihoods"], expected)))
        assert record["acc"] == theirs["acc"] and record["acc_norm"] == theirs["acc_norm"], record["line"]
    assert worst <= LOGLIKELIHOOD_ATOL, f"max |Δ log-likelihood| = {worst:.2e}"
    if shots:  # the window really was too short: some contexts were cut
        assert any(r["context_tokens"] + max(r["tokens"]) > BLOCK + 1 for r in mine)
