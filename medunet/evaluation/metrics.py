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
