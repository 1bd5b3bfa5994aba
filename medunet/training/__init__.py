"""Training: loop, loss, optimizer and schedule, checkpoints and resume; ``run_job`` is ``medunet train``."""

from medunet.training.job import Tracking, TrainJob, TrainOutcome, run_job
from medunet.training.loop import TrainRequest, TrainResult, train

__all__ = ["Tracking", "TrainJob", "TrainOutcome", "TrainRequest", "TrainResult", "run_job", "train"]
