"""Fine-tuning end to end on real data, through the shared training loop."""
import json

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.finetune.classify import read_labeled
from minigpt.finetune.completion import completion_loss, read_prompt_completion
from minigpt.finetune.evaluate import predict
from minigpt.finetune.export import load_finetuned
from minigpt.finetune.lora import LoRALinear
from minigpt.finetune.check import check_prompt_completion
from minigpt.finetune.config import FinetuneConfig, default_train_config
from minigpt.finetune.run import finetune
from tests.helpers import DATA, need_file, use_tiktoken_cache


@pytest.fixture
def tokenizer(monkeypatch):
    use_tiktoken_cache(monkeypatch)
    from minigpt import Tokenizer

    return Tokenizer()


def test_classifier_from_scratch_beats_the_majority_baseline_on_sst2(tmp_path, tokenizer):
    """A one-layer GPT with GPT-2's tokens, trained from scratch for 300 steps on SST-2's
    training rows, classifies the held-out rows well above always saying "positive"."""
    train_file = need_file(DATA / "sentiment" / "train.csv")
    val_file = need_file(DATA / "sentiment" / "validation.csv")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=48, n_layer=1, n_head=2, n_embd=32))
    config = FinetuneConfig(task="classify", train_file=str(train_file), val_file=str(val_file), max_length=48)
    train_config = default_train_config(config, str(tmp_path / "run"), dict(
        max_steps=300, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=20, weight_decay=0.0,
        eval_interval=100, device="cpu", progress=False))
    result = finetune(config, train_config, model=model, tokenizer=tokenizer)

    report = result.report
    assert report.n == 960 and report.majority_baseline == pytest.approx(496 / 960)
    assert report.accuracy > report.majority_baseline + 0.12, report.format()
    assert report.macro_f1 > 0.6
    # The exported model is the best checkpoint by val_accuracy, and it predicts the same.
    assert report.accuracy == pytest.approx(max(e["val_accuracy"] for e in result.train_result.evals))
    rows = read_labeled(val_file)[:64]
    preds = predict(result.model_dir, [r.text for r in rows])
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["accuracy"] == report.accuracy
    assert (tmp_path / "run" / "eval" / "confusion_matrix.png").is_file()
    _, _, meta, labels = load_finetuned(result.model_dir)
    assert labels.labels == ("negative", "positive") and meta.max_length == 48
    assert len(preds) == 64


def headlines(tmp_path, tokenizer, block_size, n_train, n_val):
    """The first rows of headlines/, cleaned by the checker (separator, leading space, stop,
    rows too long for block_size dropped)."""
    out = {}
    for split, n in (("train", n_train), ("validation", n_val)):
        source = need_file(DATA / "headlines" / f"{split}.jsonl")
        subset = tmp_path / f"{split}.jsonl"
        subset.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
        report = check_prompt_completion(subset, tokenizer, block_size, fix=True,
                                         out=tmp_path / f"{split}.fixed.jsonl")
        assert report.written and len(report.kept) > 0.8 * n
        out[split] = report.written
    return out["train"], out["validation"]


def test_completion_finetune_lowers_held_out_completion_loss(tmp_path, tokenizer):
    train_file, val_file = headlines(tmp_path, tokenizer, block_size=96, n_train=400, n_val=16)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=96, n_layer=2, n_head=2, n_embd=16))
    val_pairs = read_prompt_completion(val_file)
    before, _ = completion_loss(model, tokenizer, val_pairs)
    config = FinetuneConfig(task="completion", train_file=str(train_file), val_file=str(val_file),
                            packing=True, max_generate=4)
    train_config = default_train_config(config, str(tmp_path / "run"), dict(
        max_steps=20, batch_size=3, lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_interval=20, device="cpu",
        progress=False))
    result = finetune(config, train_config, model=model, tokenizer=tokenizer)
    after = result.report.loss
    assert after < before - 1.0, (before, after)  # from ~ln(50257) = 10.8 nats: perplexity down e-fold
    assert result.report.generated == 4
    _, _, meta, _ = load_finetuned(result.model_dir)
    assert meta.separator == "\n\n###\n\n" and meta.stop == "\n"
    # The loop's val_loss uses the same masked objective (mean of batch means vs per token).
    assert result.train_result.evals[-1]["val_loss"] == pytest.approx(after, rel=0.05)


def test_lora_finetune_changes_only_adapters_and_exports_merged(tmp_path, tokenizer):
    train_file, val_file = headlines(tmp_path, tokenizer, block_size=96, n_train=100, n_val=8)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=96, n_layer=2, n_head=2, n_embd=32))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = FinetuneConfig(task="completion", train_file=str(train_file), val_file=str(val_file),
                            lora_rank=4, lora_alpha=8, max_generate=0)
    train_config = default_train_config(config, str(tmp_path / "run"), dict(
        max_steps=6, batch_size=4, warmup_steps=0, eval_interval=6, device="cpu", progress=False))
    result = finetune(config, train_config, model=model, tokenizer=tokenizer)
    # rank 4 on qkv (32 -> 96), proj (32 -> 32), fc (32 -> 128), proj (128 -> 32), in 2 blocks
    assert result.trainable_params == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 8 and all(bool(m.lora_B.detach().abs().sum() > 0) for m in lora)
    for name, value in model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, start[name.replace(".base.", ".")]), f"{name} changed"
    exported, _, _, _ = load_finetuned(result.model_dir)
    assert not any(isinstance(m, LoRALinear) for m in exported.modules())
    idx = torch.randint(0, 50257, (2, 20))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(idx).logits, model(idx).logits, rtol=1e-4, atol=1e-4)


def test_cli_finetunes_with_lora_resumes_and_predicts(tmp_path, tokenizer, capsys):
    from minigpt.cli import main

    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path / "base")
    rows = need_file(DATA / "sentiment" / "validation.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "data.csv").write_text("".join(rows[:81]), encoding="utf-8")  # header + 80 rows
    run = tmp_path / "run"
    command = ["finetune", "classify", "--init", str(tmp_path / "base"), "--train-file", str(tmp_path / "data.csv"),
               "--out", str(run), "--max-length", "32", "--lora-rank", "2", "--batch_size=8", "--eval_interval=4",
               "--cpu_threads=1", "--progress=false"]
    main([*command, "--max_steps=4"])
    out = capsys.readouterr().out
    assert "macro avg" in out and f"model: {run / 'model'}" in out
    main([*command, "--max_steps=8", "--resume"])
    capsys.readouterr()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert steps == [4, 8]  # the second run continued the first
    info = json.loads((run / "checkpoints" / "step_0000008" / "trainer.json").read_text())
    assert info["run_metadata"]["finetune"]["lora_rank"] == 2 and info["train_config"]["lr"] == 1e-3
    main(["predict", str(run / "model"), "a gem", "dreadful"])
    labels = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert len(labels) == 2 and set(labels) <= {"negative", "positive"}
    with pytest.raises(SystemExit):
        main([*command, "--max_stepz=3"])
    assert "--max_stepz: did you mean --max_steps?" in capsys.readouterr().err


def test_starts_from_a_minigpt_training_run(tmp_path, tokenizer):
    """init may be a run folder of the shared loop (its best checkpoint is used)."""
    from minigpt.finetune.data import CompletionExample, ShuffledBatches, collate_completion
    from minigpt.finetune.run import prepare
    from minigpt.train.config import TrainConfig
    from minigpt.train.loop import train

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=1, n_embd=8))
    rows = [CompletionExample(tuple(range(i, i + 9)), (True,) * 9) for i in range(8)]
    config = TrainConfig(out_dir=str(tmp_path / "pre"), max_steps=2, batch_size=2, eval_interval=2, eval_steps=1,
                         device="cpu", progress=False, cpu_threads=1)
    train(model, config, ShuffledBatches(rows, 2, collate_completion),
          eval_batches=lambda: [collate_completion(rows[:2])])
    (tmp_path / "data.csv").write_text("text,label\ngood,pos\nbad,neg\nfine,pos\nawful,neg\n")
    run, _ = prepare(FinetuneConfig(task="classify", train_file=str(tmp_path / "data.csv"), init=str(tmp_path / "pre"),
                                    val_fraction=0.5),
                     default_train_config(FinetuneConfig(task="classify", train_file="x"), str(tmp_path / "ft"),
                                          dict(device="cpu")), tokenizer=tokenizer)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(run.model.backbone.state_dict()[name], value)
