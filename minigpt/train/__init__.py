"""Training: the shared loop (`loop`) and its parts (config, optim, parallel, checkpoint, observe, state)."""
from minigpt.train.config import TrainConfig
from minigpt.train.loop import language_model_loss, train
from minigpt.train.optim import build_optimizer, lr_at
from minigpt.train.state import Batches, NonFiniteLossError, TrainResult

__all__ = [
    "Batches",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "language_model_loss",
    "lr_at",
    "train",
]
