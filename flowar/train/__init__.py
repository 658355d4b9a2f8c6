"""Training: the loop, EMA, schedules and checkpoints."""

from flowar.train.config import TrainConfig
from flowar.train.loop import NonFiniteError, TrainResult, train

__all__ = ["NonFiniteError", "TrainConfig", "TrainResult", "train"]
