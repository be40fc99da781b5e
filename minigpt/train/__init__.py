"""Training: the shared loop (`loop`) and its parts (config, optim, parallel, checkpoint, observe, state), and pretraining set-up."""
from minigpt.train.loop import (
    Batches,
    NonFiniteLossError,
    TrainConfig,
    TrainResult,
    build_optimizer,
    language_model_loss,
    lr_at,
    train,
)

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
