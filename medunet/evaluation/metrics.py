"""Per-class metrics on label maps (MONAI's implementations), as small pure functions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(*S)`` class indices -> ``(1, K, *S)`` one-hot."""
    return one_hot(labels.long()[None, None], num_classes=num_classes)


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice of classes ``1..K-1`` for label maps ``(*S)``; a class absent from both scores 1."""
    p, t = _one_hot(pred, num_classes), _one_hot(label, num_classes)
    return compute_dice(p, t, include_background=False, ignore_empty=False)[0].cpu().numpy()


def hd95_per_class(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """95th-percentile Hausdorff distance (in mm with ``spacing``) of classes ``1..K-1``.

    NaN where the class is missing from the prediction or the reference.
    """
    p, t = _one_hot(pred, num_classes), _one_hot(label, num_classes)
    hd = compute_hausdorff_distance(p, t, include_background=False, percentile=95, spacing=spacing)
    return hd[0].cpu().numpy().astype(np.float64)


def overlap_counts(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> np.ndarray:
    """``(K-1, 3)`` counts of (intersection, predicted, reference) voxels for classes ``1..K-1``.

    Sums of these over the slices of a volume give the volume's Dice (``dice_from_counts``).
    """
    counts = np.zeros((num_classes - 1, 3), dtype=np.int64)
    for k in range(1, num_classes):
        p, t = pred == k, label == k
        counts[k - 1] = (int((p & t).sum()), int(p.sum()), int(t.sum()))
    return counts


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """Dice per class from ``overlap_counts``; a class absent from both scores 1."""
    inter, p, t = counts[:, 0], counts[:, 1], counts[:, 2]
    denom = p + t
    return np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1), 1.0)
