"""Pretraining, all in this package: text -> token shards (`prepare`, reading inputs in
`sources`, the folder format in `meta`), shards -> batches (`dataset`), the corpus that
ships with the package (`corpora`), recipes (`recipes`), the run config (`config`) and the entry that
hands a run to the shared training loop (`run.pretrain`)."""
from minigpt.pretrain.config import PrepareConfig
from minigpt.pretrain.dataset import FixedWindows, RandomWindows, TokenSplit
from minigpt.pretrain.meta import read_metadata
from minigpt.pretrain.prepare import prepare

__all__ = ["PrepareConfig", "prepare", "read_metadata", "TokenSplit", "RandomWindows", "FixedWindows"]
