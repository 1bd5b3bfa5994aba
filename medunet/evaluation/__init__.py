"""Metrics and reports."""

from medunet.evaluation.metrics import dice_per_class, hd95_per_class

__all__ = ["dice_per_class", "hd95_per_class"]
