"""Training: loop, loss, optimizer and schedule, checkpoints and resume."""

from medunet.training.loop import TrainRequest, TrainResult, train

__all__ = ["TrainRequest", "TrainResult", "train"]
