"""Metrics and reports."""

from medunet.evaluation.metrics import dice_from_counts, dice_per_class, hd95_per_class, overlap_counts
from medunet.evaluation.report import evaluate_folders, score_case

__all__ = ["dice_from_counts", "dice_per_class", "evaluate_folders", "hd95_per_class", "overlap_counts", "score_case"]
