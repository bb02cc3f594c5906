"""The training loop, checkpoints, EMA and logging."""

from vrpo.train.loop import Trainer, TrainingDiverged, TrainResult, train

__all__ = ["TrainResult", "Trainer", "TrainingDiverged", "train"]
