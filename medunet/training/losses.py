"""DiceCE with the Dice taken over the whole global batch, also when the batch is split across ranks.

MONAI's ``DiceCELoss(batch=True)`` sums the soft intersection and the class volumes over the batch
before dividing. Under DDP each rank holds only part of the batch, and a Dice of the parts is not the
Dice of the whole. Here the per-class sums are added across ranks with an all-reduce that gradients
flow back through, so the loss and, after DDP's gradient averaging, the update are those of one
process holding the global batch. In a single process it is MONAI's ``DiceCELoss(to_onehot_y=True,
softmax=True, batch=True)`` (a test checks that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from medunet.training.distributed import differentiable_sum


class GlobalBatchDiceCELoss(_Loss):
    def __init__(self, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5) -> None:
        super().__init__()
        self.smooth_nr = smooth_nr
        self.smooth_dr = smooth_dr

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, C, *spatial); ``target`` (B, 1, *spatial) holding class indices."""
        classes = logits.shape[1]
        labels = target[:, 0].long()
        logits = logits.float()
        probs = torch.softmax(logits, dim=1)
        onehot = F.one_hot(labels, classes).movedim(-1, 1).to(probs.dtype)
        axes = [0, *range(2, logits.dim())]
        sums = torch.stack([(probs * onehot).sum(axes), onehot.sum(axes), probs.sum(axes)])  # (3, C)
        intersection, ground, predicted = differentiable_sum(sums)
        dice = 1.0 - (2.0 * intersection + self.smooth_nr) / (ground + predicted + self.smooth_dr)
        # every rank holds an equal share of the batch, so the mean of the ranks' means is the global mean
        return dice.mean() + F.cross_entropy(logits, labels)
