"""The CLI a newcomer meets: any model folder, run or fine-tuning run where a model goes;
help that shows defaults and recipes; quiet pipes; clear errors for a user's mistakes."""
import json
import subprocess
import sys

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.cli import main
from minigpt.finetune.run import start_model
from minigpt.model_dir import resolve_model_dir
from tests.helpers import randomize_, use_tiktoken_cache

CONFIG = GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=16)


def training_run(root, best_step: int = 2):
    """A run folder as `minigpt train` leaves it: checkpoints/step_N model folders and best.json."""
    for step in (1, 2, 3):
        randomize_(GPT(CONFIG), seed=step).save_pretrained(root / "checkpoints" / f"step_{step:07d}")
    (root / "checkpoints" / "best.json").write_text(json.dumps({"dir": f"step_{best_step:07d}"}))
    return root


def test_a_training_run_means_its_best_checkpoint_said_once(tmp_path, caplog):
    run = training_run(tmp_path / "run")
    with caplog.at_level("INFO"):
        assert resolve_model_dir(run) == run / "checkpoints" / "step_0000002"
    assert sum("best checkpoint" in r.message for r in caplog.records) == 1
    (run / "checkpoints" / "best.json").unlink()
    assert resolve_model_dir(run) == run / "checkpoints" / "step_0000003"  # else the newest
    (tmp_path / "ft" / "model").mkdir(parents=True)
    GPT(CONFIG).save_pretrained(tmp_path / "ft" / "model")
    assert resolve_model_dir(tmp_path / "ft") == tmp_path / "ft" / "model"  # a fine-tuning run's export
    assert resolve_model_dir(tmp_path / "ft" / "model") == tmp_path / "ft" / "model"


def test_a_folder_without_a_model_names_every_place_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        resolve_model_dir(tmp_path)
    for place in ("config.json", "model/config.json", "checkpoints"):
        assert str(tmp_path / place) in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_dir(tmp_path / "nope")


def test_sample_and_logit_lens_accept_a_run_folder(tmp_path, monkeypatch, capsys):
    use_tiktoken_cache(monkeypatch)
    run = training_run(tmp_path / "run")
    main(["sample", "--model", str(run), "--prompt", "Hi", "--max-new-tokens", "3", "--temperature", "0", "--threads", "1"])
    direct = capsys.readouterr().out
    main(["sample", "--model", str(run / "checkpoints" / "step_0000002"), "--prompt", "Hi", "--max-new-tokens", "3",
          "--temperature", "0"])
    assert capsys.readouterr().out == direct
    main(["logit-lens", "--model", str(run), "--prompt", "Hi there"])
    assert capsys.readouterr().out.strip()


def test_init_preset_is_a_fresh_random_model_with_gpt2_tokens(monkeypatch):
    use_tiktoken_cache(monkeypatch)
    a, tokenizer = start_model("tiny-bpe", seed=3)
    b, _ = start_model("tiny-bpe", seed=3)
    assert a.config.vocab_size == tokenizer.vocab_size == 50257 and a.config.n_layer == 4
    torch.testing.assert_close(a.tok_emb.weight, b.tok_emb.weight)  # seeded
    with pytest.raises(ValueError, match="vocab_size=65.*tiny-bpe"):
        start_model("tiny")


def test_start_model_adds_the_special_tokens_to_model_and_tokenizer_and_takes_a_model_in_memory(monkeypatch):
    use_tiktoken_cache(monkeypatch)
    model, tokenizer = start_model("tiny-bpe", ["<|startoftext|>", "<|pad|>"], "<|pad|>", seed=3)
    assert tokenizer.added_tokens == ("<|startoftext|>", "<|pad|>") and tokenizer.pad_id == 50258
    assert model.config.vocab_size == tokenizer.vocab_size == 50259
    same, again = start_model(model, ["<|startoftext|>"], tokenizer=tokenizer)
    assert same is model and again is tokenizer and model.config.vocab_size == 50259  # nothing new to add


def test_help_shows_defaults_recipes_and_finetune_defaults(capsys):
    for argv in (["sample", "--help"], ["train", "--help"], ["finetune", "classify", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "(default:" in out
        if argv[0] == "train":
            assert "tiny-bpe" in out and "nanogpt-cpu" in out and "minigpt/train/config.py" in out
        if argv[0] == "finetune":
            assert "max_steps=1000" in out and "FINETUNE_TRAIN" not in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_show_config_prints_the_effective_config_without_training(tmp_path, capsys):
    main(["train", "--preset", "tiny-bpe", "--out-dir", str(tmp_path / "run"), "--show-config", "--max_steps=7"])
    config = json.loads(capsys.readouterr().out)
    assert config["model"]["vocab_size"] == 50257 and config["train"]["max_steps"] == 7
    # first_hour.md's figures were measured at this shape, not the tiny preset's own
    assert (config["model"]["n_layer"], config["model"]["n_head"], config["model"]["n_embd"]) == (4, 4, 128)
    assert config["data"]["tokenizer"] == "gpt2" and not (tmp_path / "run").exists()


def test_a_closed_pipe_ends_quietly():
    command = (f"{sys.executable} -m minigpt inspect gpt3 | head -c 10 >/dev/null; "
               f"{sys.executable} -m minigpt train --help | head -n 1")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert "Broken pipe" not in result.stderr and "Traceback" not in result.stderr


def test_predict_jsonl_without_the_text_field_is_a_clear_error(tmp_path):
    from minigpt.finetune.evaluate import read_texts

    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "fine"}\n{"review": "no text field"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: .*'text'"):  # the file, the line, the field; no KeyError
        read_texts(path)


def test_evaluate_refuses_to_overwrite_an_evaluation(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text("{}")
    GPT(CONFIG).save_pretrained(tmp_path / "model")
    with pytest.raises(SystemExit, match="already holds an evaluation.*--overwrite"):
        main(["evaluate", str(tmp_path / "model"), "data.csv", "--out", str(tmp_path / "eval")])
