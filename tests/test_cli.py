import subprocess
import sys

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


def test_cli_errors_are_one_line_not_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minigpt", "sample", "--model", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "minigpt sample: error:" in result.stderr and "no config.json" in result.stderr
    assert "Traceback" not in result.stderr
