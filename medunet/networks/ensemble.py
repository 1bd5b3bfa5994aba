"""Several trained copies of one architecture (cross-validation folds) as one network.

The output is the log of the members' mean class probabilities: its argmax is the ensemble's label
and its softmax the averaged probabilities, so sliding-window inference, blending and bundles treat
an ensemble exactly like a single network.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from medunet.config import NetworkConfig


class FoldEnsemble(nn.Module):
    """``members`` (built by ``medunet.networks.create_network`` from ``cfg`` with ``ensemble=1``) as one network."""

    def __init__(self, cfg: NetworkConfig, members: Iterable[nn.Module]) -> None:
        super().__init__()
        self.config = cfg
        self.members = nn.ModuleList(members)
        if len(self.members) != cfg.ensemble:
            raise ValueError(f"an ensemble of {cfg.ensemble} needs as many members, got {len(self.members)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for member in self.members:
            probs = torch.softmax(member(x).float(), dim=1)
            total = probs if total is None else total.add_(probs)
        assert total is not None
        return total.div_(len(self.members)).clamp_min_(1e-7).log_()
