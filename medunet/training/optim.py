"""Optimizer and learning-rate schedule from ``TrainConfig``."""

from __future__ import annotations

import math

import torch
from torch import nn

from medunet.config import Optimizer, Scheduler, TrainConfig

# TrainConfig refuses other names when it is built; these errors guard a config built around that check
OPTIMIZERS = tuple(m.value for m in Optimizer)
SCHEDULERS = tuple(m.value for m in Scheduler)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.learning_rate, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of {OPTIMIZERS}")


def lr_factor(cfg: TrainConfig, progress: float) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1] of the run (warm-up, then decay)."""
    warm = cfg.warmup_epochs / max(cfg.epochs, 1)
    if progress < warm:
        return min((progress + 1e-3) / warm, 1.0)
    p = min(max((progress - warm) / max(1.0 - warm, 1e-8), 0.0), 1.0)
    if cfg.scheduler == "cosine":
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * p))
    if cfg.scheduler == "poly":
        return max((1.0 - p) ** 0.9, 0.02)
    if cfg.scheduler == "constant":
        return 1.0
    raise ValueError(f"unknown scheduler {cfg.scheduler!r}; choose one of {SCHEDULERS}")


def set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, progress: float) -> float:
    lr = cfg.learning_rate * lr_factor(cfg, progress)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
