"""Saving, loading, evaluating and predicting with fine-tuned folders, and their CLI commands
(models built directly here; training itself is tested in tests/train/test_finetune.py)."""
import json
import math

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.cli import main
from minigpt.finetune.classifier import GPTClassifier
from minigpt.finetune.classify import read_labeled
from minigpt.finetune.completion import PromptCompletion, completion_loss
from minigpt.finetune.data import LabelMap
from minigpt.finetune.evaluate import evaluate, predict
from minigpt.finetune.export import FinetuneMeta, load_finetuned, save_finetuned
from minigpt.finetune.lora import LoRALinear, apply_lora
from tests.helpers import randomize_, use_tiktoken_cache
from tests.finetune.common import bigram_gpt

CONFIG = GPTConfig(vocab_size=50257, block_size=32, n_layer=2, n_head=2, n_embd=16)
LABELS = LabelMap(("negative", "neutral", "positive"))


@pytest.fixture
def tokenizer(monkeypatch):
    use_tiktoken_cache(monkeypatch)
    from minigpt import Tokenizer

    return Tokenizer()


def lora_classifier():
    torch.manual_seed(0)
    model = GPTClassifier(randomize_(GPT(CONFIG), seed=2, std=0.1), len(LABELS))
    apply_lora(model, rank=2, trainable=("score.",))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.5)
    return model.eval()


def test_saved_classifier_is_merged_gpt2_layout_and_loads_identically(tmp_path, tokenizer):
    model = lora_classifier()
    save_finetuned(model, tmp_path, tokenizer, FinetuneMeta("classify", max_length=16), LABELS)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
    assert {p.name for p in tmp_path.iterdir()} >= {"model.safetensors", "classifier_head.safetensors",
                                                    "labels.json", "finetune.json", "vocab.json", "merges.txt",
                                                    "tokenizer_config.json"}
    assert any(isinstance(m, LoRALinear) for m in model.modules())  # the trained model is left as it was
    loaded, _, meta, labels = load_finetuned(tmp_path)
    assert labels == LABELS and meta.max_length == 16
    idx = torch.randint(0, 50257, (3, 9))
    lengths = torch.tensor([9, 4, 1])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(idx, lengths), model(idx, lengths), rtol=1e-5, atol=1e-5)
    transformers = pytest.importorskip("transformers")
    transformers.GPT2LMHeadModel.from_pretrained(tmp_path)  # the backbone is a plain GPT-2 folder


def test_evaluate_and_predict_agree_with_the_model(tmp_path, tokenizer, capsys):
    model = lora_classifier()
    folder = tmp_path / "model"
    save_finetuned(model, folder, tokenizer, FinetuneMeta("classify", max_length=16), LABELS)
    data = tmp_path / "eval.csv"
    data.write_text("review,stars\nawful film,negative\nit was fine,neutral\nlovely,positive\nmeh,neutral\n")
    report = evaluate(folder, data, out_dir=tmp_path / "eval", text_column="review", label_column="stars")
    texts = [r.text for r in read_labeled(data, "review", "stars")]
    preds = predict(folder, texts)
    truth = ["negative", "neutral", "positive", "neutral"]
    assert report.accuracy == sum(p.label == t for p, t in zip(preds, truth)) / 4
    assert all(abs(sum(p.probabilities.values()) - 1) < 1e-5 for p in preds)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 4
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file()

    main(["predict", str(folder), "awful film", "lovely"])
    lines = capsys.readouterr().out.splitlines()
    assert [l.split("\t")[0] for l in lines] == [preds[0].label, preds[2].label]
    (tmp_path / "texts.txt").write_text("awful film\n\nlovely\n")
    main(["predict", str(folder), "--file", str(tmp_path / "texts.txt"), "--json"])
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["awful film", "lovely"] and set(rows[0]["probabilities"]) == set(LABELS.labels)

    main(["evaluate", str(folder), str(data), "--text-column", "review", "--label-column", "stars"])
    assert "macro avg" in capsys.readouterr().out


def test_completion_model_evaluation(tmp_path, tokenizer, capsys):
    torch.manual_seed(0)
    model = randomize_(GPT(CONFIG), seed=1, std=0.1).eval()
    folder = tmp_path / "model"
    save_finetuned(model, folder, tokenizer, FinetuneMeta("completion", stop="\n"))
    data = tmp_path / "val.jsonl"
    pairs = [{"prompt": "Sky ->", "completion": " blue\n"}, {"prompt": "Grass ->", "completion": " green\n"}]
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    report = evaluate(folder, data, out_dir=tmp_path / "eval", max_generate=2)
    # 2 completion tokens + the eos token ("\n" is one token) per pair.
    assert report.tokens == sum(len(tokenizer.encode(p["completion"])) + 1 for p in pairs)
    assert report.perplexity == pytest.approx(math.exp(report.loss))
    assert report.generated == 2 and report.exact_match in (0.0, 0.5, 1.0)
    loss, _ = completion_loss(model, tokenizer, [PromptCompletion(p["prompt"], p["completion"], 1) for p in pairs])
    assert loss == pytest.approx(report.loss)
    # The same pairs as a CSV with other column names, through the CLI, score the same.
    (tmp_path / "val.csv").write_text('q,a\nSky ->," blue\n"\nGrass ->," green\n"\n')
    main(["evaluate", str(folder), str(tmp_path / "val.csv"), "--prompt-column", "q", "--completion-column", "a",
          "--max-generate", "0", "--out", str(tmp_path / "eval_csv")])
    assert json.loads((tmp_path / "eval_csv" / "metrics.json").read_text())["loss"] == pytest.approx(report.loss)
    with pytest.raises(ValueError, match="completion model"):
        predict(folder, ["x"])


def test_fewshot_cli_on_a_constructed_model(tmp_path, tokenizer, capsys):
    model = bigram_gpt([(" great", " positive"), (" terrible", " negative")], tokenizer)
    model.save_pretrained(tmp_path / "lm")
    (tmp_path / "shots.csv").write_text("text,label\nso great,positive\nquite terrible,negative\n")
    (tmp_path / "data.csv").write_text("text,label\njust great,positive\nreally terrible,negative\n"
                                       "great great,positive\n")
    main(["fewshot", str(tmp_path / "lm"), "--shots", str(tmp_path / "shots.csv"), "--data",
          str(tmp_path / "data.csv"), "--k", "2", "--template", "Review: {text}", "--out", str(tmp_path / "fs")])
    assert "accuracy" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "fs" / "metrics.json").read_text())
    assert metrics["accuracy"] == 1.0 and metrics["k"] == 2 and metrics["prompt"].endswith("Review: <text>")


def test_check_cli_reports_and_fixes(tmp_path, tokenizer, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"}\nnope\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "check", str(data)])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "line 2: duplicate of line 1" in out and "line 3: not valid JSON" in out
    main(["finetune", "check", str(data), "--fix", "--out", str(tmp_path / "clean.jsonl")])
    assert "wrote 1 rows" in capsys.readouterr().out
    assert json.loads((tmp_path / "clean.jsonl").read_text()) == {"prompt": "a\n\n###\n\n", "completion": " b\n"}


@pytest.mark.parametrize("text, message", [
    ('{"task": ', r"is not valid JSON"),
    ('{"task": "classify", "colour": 1}', r"unknown FinetuneMeta keys \['colour'\]"),
    ('{"max_length": 3}', r"task"),
    ('{"task": "classify", "max_length": "3"}', r"FinetuneMeta.max_length='3' \(str\) must be an integer"),
])
def test_bad_finetune_json_names_file(tmp_path, text, message):
    from minigpt.finetune.export import read_meta

    (tmp_path / "finetune.json").write_text(text)
    with pytest.raises(ValueError, match=rf"finetune\.json.*{message}"):
        read_meta(tmp_path)
