import subprocess
import sys

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.cli import main
from tests.helpers import randomize_, use_tiktoken_cache


def test_sample_streams_the_same_text_as_the_library(tmp_path, monkeypatch, capsys):
    use_tiktoken_cache(monkeypatch)
    config = GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=16)
    model = randomize_(GPT(config), seed=5).eval()
    model.save_pretrained(tmp_path)
    main(["sample", "--model", str(tmp_path), "--prompt", "Once upon", "--max-new-tokens", "12", "--temperature", "0"])
    from minigpt import Tokenizer, generate_text

    expected = "Once upon" + generate_text(model, Tokenizer(), "Once upon", 12, temperature=0)[0] + "\n"
    assert capsys.readouterr().out == expected


def test_sample_in_bfloat16_streams_the_text_of_the_model_in_bfloat16(tmp_path, monkeypatch, capsys):
    use_tiktoken_cache(monkeypatch)
    config = GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=16)
    model = randomize_(GPT(config), seed=5).eval()
    model.save_pretrained(tmp_path)
    main(["sample", "--model", str(tmp_path), "--prompt", "Once upon", "--max-new-tokens", "12", "--temperature", "0",
          "--dtype", "bfloat16"])
    from minigpt import Tokenizer, generate_text

    expected = "Once upon" + generate_text(model.to(torch.bfloat16), Tokenizer(), "Once upon", 12, temperature=0)[0]
    assert capsys.readouterr().out == expected + "\n"


def test_cli_errors_are_one_line_not_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minigpt", "sample", "--model", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "minigpt sample: error:" in result.stderr and "no config.json" in result.stderr
    assert "Traceback" not in result.stderr


def run_cli(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "minigpt", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_device_cuda_without_cuda_is_clear(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=8)).save_pretrained(tmp_path)
    result = run_cli("sample", "--model", str(tmp_path), "--device", "cuda")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "minigpt sample: error: device 'cuda' was asked for, but this machine has no CUDA GPU" in result.stderr
    assert "use --device cpu" in result.stderr


def test_user_errors_exit_1_with_one_paragraph(tmp_path):
    GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=8)).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    (tmp_path / "bad.toml").write_text("[train]\nlr = \n")
    (tmp_path / "str.toml").write_text('[train]\nprogress = "no"\n')
    cases = [
        (["sample", "--model", str(tmp_path / "m")], "model.safetensors is damaged or incomplete"),
        (["train", "--config", str(tmp_path / "bad.toml")], "is not valid TOML"),
        (["train", "--config", str(tmp_path / "str.toml")], "train.progress='no' (str) must be true or false"),
        (["train", "--lr=abc"], "--train.lr='abc' must be a number"),
    ]
    for args, message in cases:  # SystemExit(text) prints text to stderr and exits with status 1
        with pytest.raises(SystemExit) as info:
            main(args)
        assert isinstance(info.value.code, str) and info.value.code.startswith(f"minigpt {args[0]}: error: ")
        assert message in info.value.code and "\n" not in info.value.code
