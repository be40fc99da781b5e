"""Training data: text -> token shards (`prepare`), shards -> batches (`dataset`)."""
from minigpt.data.dataset import FixedWindows, RandomWindows, TokenSplit, read_metadata
from minigpt.data.prepare import PrepareConfig, prepare

__all__ = ["PrepareConfig", "prepare", "read_metadata", "TokenSplit", "RandomWindows", "FixedWindows"]
