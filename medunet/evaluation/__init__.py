"""Metrics and reports."""

from medunet.evaluation.metrics import dice_per_class, hd95_per_class
from medunet.evaluation.report import evaluate_folders, score_case

__all__ = ["dice_per_class", "evaluate_folders", "hd95_per_class", "score_case"]
