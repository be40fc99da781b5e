"""minigpt: a from-scratch decoder-only transformer (GPT-2 / GPT-3 / GPT-Neo) in plain PyTorch."""
from minigpt.config import GPTConfig
from minigpt.presets import PRESETS
from minigpt.counts import flops_per_token, params
from minigpt.generate import generate, generate_text, stream_text
from minigpt.model import GPT, GPTOutput
from minigpt.tokenizer import CharTokenizer, Tokenizer

__all__ = [
    "GPT",
    "GPTConfig",
    "GPTOutput",
    "PRESETS",
    "Tokenizer",
    "CharTokenizer",
    "params",
    "flops_per_token",
    "generate",
    "generate_text",
    "stream_text",
]
__version__ = "0.1.0"
