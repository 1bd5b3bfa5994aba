"""Inference: loading models, sliding-window segmentation, writing masks."""

from medunet.inference.batch import BatchResult, Job, expand_inputs, plan_jobs, run_jobs, write_segmentation
from medunet.inference.loading import load_model
from medunet.inference.model import SegmentationModel
from medunet.inference.predictor import Segmentation, segment, segment_image

__all__ = [
    "BatchResult",
    "Job",
    "Segmentation",
    "SegmentationModel",
    "expand_inputs",
    "load_model",
    "plan_jobs",
    "run_jobs",
    "segment",
    "segment_image",
    "write_segmentation",
]
