"""MONAI pipelines for training, evaluation and inference."""

from medunet.transforms.loading import LoadCased, TakeSliced, check_same_geometry, take_slice
from medunet.transforms.pipelines import (
    augment_transform,
    inference_transform,
    preprocess_transform,
    training_transform,
)

__all__ = [
    "LoadCased",
    "TakeSliced",
    "augment_transform",
    "check_same_geometry",
    "inference_transform",
    "preprocess_transform",
    "take_slice",
    "training_transform",
]
