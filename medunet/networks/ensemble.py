"""Several trained copies of one architecture (cross-validation folds) as one network.

The output is the log of the members' mean class probabilities: its argmax is the ensemble's label
and its softmax the averaged probabilities, so sliding-window inference, blending and bundles treat
an ensemble exactly like a single network.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from medunet.config import NetworkConfig


class FoldEnsemble(nn.Module):
    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        from medunet.networks.registry import create_network

        member = dataclasses.replace(cfg, ensemble=1)  # in eval mode a deep-supervised member gives its main output
        self.config = cfg
        self.members = nn.ModuleList(create_network(member) for _ in range(cfg.ensemble))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for member in self.members:
            probs = torch.softmax(member(x).float(), dim=1)
            total = probs if total is None else total.add_(probs)
        assert total is not None
        return total.div_(len(self.members)).clamp_min_(1e-7).log_()
