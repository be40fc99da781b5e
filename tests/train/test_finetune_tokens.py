"""Fine-tuning with added special tokens, and classification taught as completion."""
import json

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.finetune.data import IGNORE_INDEX, collate_completion
from minigpt.finetune.export import load_finetuned
from minigpt.finetune.config import FinetuneConfig, default_train_config
from minigpt.finetune.run import finetune, prepare
from minigpt.finetune.completion import masked_lm_loss
from minigpt.train.loop import language_model_loss
from tests.helpers import DATA, need_file, randomize_, use_tiktoken_cache


@pytest.fixture
def tokenizer(monkeypatch):
    use_tiktoken_cache(monkeypatch)
    from minigpt import Tokenizer

    return Tokenizer()


def write_pairs(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs), encoding="utf-8")
    return path


def test_named_tokens_are_added_and_frame_every_prompt(tmp_path, tokenizer):
    data = write_pairs(tmp_path / "pc.jsonl", [("Oil prices rise", " business"), ("Team wins cup final again", " sport"),
                                               ("Stocks fall", " business"), ("Striker scores twice", " sport")])
    model = GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=8))
    config = FinetuneConfig(task="completion", train_file=str(data), val_file=str(data), bos="<|startoftext|>",
                            sep_token="<|sep|>", pad_token="<|pad|>")
    run, tok = prepare(config, default_train_config(config, str(tmp_path / "run"), dict(device="cpu", batch_size=4)),
                       model=model, tokenizer=tokenizer)
    bos, sep, pad = (tok.token_id(t) for t in ("<|startoftext|>", "<|sep|>", "<|pad|>"))
    assert (bos, sep, pad) == (50257, 50258, 50259) and model.config.vocab_size == 50260
    batch = run.train_batches.next_batch()
    idx, targets = batch["idx"], batch["targets"]
    assert (idx[:, 0] == bos).all()
    lengths = (targets != IGNORE_INDEX).sum(1)
    assert (lengths == 2).all()  # the label word and eos carry the loss, nothing else
    for row, target in zip(idx, targets):
        first = int((target != IGNORE_INDEX).nonzero()[0])
        assert row[first] == sep  # the separator is the last prompt token, and predicts the completion
    assert (idx == pad).any()  # rows of different lengths are padded with the pad token
    assert run.meta.bos == "<|startoftext|>" and run.meta.separator.endswith("<|sep|>")


def test_eos_as_bos_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="bos='<\\|endoftext\\|>' is GPT-2's eos.*<\\|startoftext\\|>"):
        FinetuneConfig(task="completion", train_file="x.jsonl", bos="<|endoftext|>")


def test_masked_lm_loss_equals_the_full_language_model_loss():
    torch.manual_seed(0)
    model = randomize_(GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=8)), std=0.2)
    from minigpt.finetune.data import CompletionExample

    rows = [CompletionExample(tuple(range(i, i + 5 + i)), (False,) * (3 + i) + (True,) * 2) for i in range(4)]
    batch = collate_completion(rows, pad_id=0)
    torch.testing.assert_close(masked_lm_loss(model, batch), language_model_loss(model, batch), rtol=1e-6, atol=1e-6)


def test_classification_as_completion_beats_the_majority_baseline_on_sst2(tmp_path, tokenizer):
    """A one-layer GPT trained from scratch on "Review: {text}\\nSentiment:" -> " positive"/
    " negative" reads the label back above always answering the majority label, both by
    label log-likelihood and by greedy completion. Masking the label out of the loss, or
    training on unrendered text, leaves it at the baseline. The head is untied: from
    scratch, a tied embedding stays at the label prior for hundreds of steps (README)."""
    train_rows = need_file(DATA / "sentiment" / "train.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    val_rows = need_file(DATA / "sentiment" / "validation.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "train.csv").write_text("".join(train_rows[:3001]), encoding="utf-8")
    (tmp_path / "val.csv").write_text("".join(val_rows[:401]), encoding="utf-8")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=40, n_layer=1, n_head=2, n_embd=32, tie_embeddings=False))
    config = FinetuneConfig(task="classify", train_file=str(tmp_path / "train.csv"), val_file=str(tmp_path / "val.csv"),
                            as_completion=True, max_length=32)
    train_config = default_train_config(config, str(tmp_path / "run"), dict(
        max_steps=150, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=10, weight_decay=0.0,
        eval_interval=150, device="cpu", progress=False))
    result = finetune(config, train_config, model=model, tokenizer=tokenizer)

    report = result.report
    baseline = report.likelihood.majority_baseline
    assert report.likelihood.n == 400
    assert report.accuracy > baseline + 0.08, report.format()
    assert report.exact_match > baseline + 0.04, report.format()
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["accuracy"] == report.accuracy and metrics["exact_match"] == report.exact_match
    loaded, _, meta, _ = load_finetuned(result.model_dir)
    assert meta.task == "completion" and meta.details["template"] == "Review: {text}\nSentiment:"


def test_cli_classify_as_completion_with_a_bos_token(tmp_path, tokenizer, capsys):
    from minigpt.cli import main
    from minigpt.tokenizer import load_tokenizer

    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=50257, block_size=48, n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path / "base")
    rows = need_file(DATA / "sentiment" / "validation.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "data.csv").write_text("".join(rows[:41]), encoding="utf-8")
    run = tmp_path / "run"
    main(["finetune", "classify", "--init", str(tmp_path / "base"), "--train-file", str(tmp_path / "data.csv"),
          "--out", str(run), "--max-length", "32", "--as-completion", "--bos", "<|startoftext|>",
          "--template", "Text: {text}\\nLabel:", "--max_steps=2", "--batch_size=8", "--eval_interval=2",
          "--cpu_threads=1", "--progress=false"])
    out = capsys.readouterr().out
    assert "labels scored by log-likelihood" in out and "greedy completion exact match" in out
    assert load_tokenizer(run / "model").added_tokens == ("<|startoftext|>",)
    _, _, meta, _ = load_finetuned(run / "model")
    assert meta.bos == "<|startoftext|>" and meta.details["template"] == "<|startoftext|>Text: {text}\nLabel:"
    assert GPT.from_pretrained(run / "model").config.vocab_size == 50258
    main(["evaluate", str(run / "model"), str(tmp_path / "data.csv"), "--out", str(tmp_path / "eval")])
    assert "labels scored by log-likelihood" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 40 and "exact_match" in metrics
