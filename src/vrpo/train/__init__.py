"""The training loop, EMA and the run logger (checkpoints live in ``vrpo.runs``)."""

from vrpo.train.loop import Trainer, TrainingDiverged, TrainResult, train

__all__ = ["TrainResult", "Trainer", "TrainingDiverged", "train"]
