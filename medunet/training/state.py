"""The state a run carries from epoch to epoch, saved to and resumed from ``last.pt``.

A resumed run continues bitwise where the saved one stopped: weights, optimizer moments, loss
scaler, the random generators (Python, NumPy, torch CPU and CUDA), the best Dice so far, the history
and the clock. The learning rate is not state: it is a function of the run's progress
(``medunet.training.optim.set_lr``), recomputed at every step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medunet.io import load_checkpoint, save_checkpoint


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states, as tensors and plain containers."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """The network, its optimizer and loss scaler, and where the run stands after ``epochs_done`` epochs."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    epochs_done: int = 0
    best_dice: float = -1.0
    best_epoch: int = -1  # 1-based, as in the history; -1 before any validation
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0  # seconds of training behind this state, across resumes

    def end_epoch(self, record: dict[str, Any]) -> bool:
        """Add the finished epoch's ``record`` (with ``seconds``, and ``dice_mean`` when validated);
        True when its Dice is the best so far."""
        improved = "dice_mean" in record and record["dice_mean"] > self.best_dice
        if improved:
            self.best_dice, self.best_epoch = record["dice_mean"], record["epoch"]
        self.epochs_done, self.elapsed = record["epoch"], record["seconds"]
        self.history.append(record)
        return improved

    def save(self, path: Path, model_file: dict[str, Any]) -> Path:
        """Write ``model_file`` (what inference loads) and this state, weights included, to ``path``,
        atomically."""
        return save_checkpoint(
            {
                **model_file,
                "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(),
                "epoch": self.epochs_done - 1,  # the last finished epoch, 0-based
                "best_dice": self.best_dice,
                "best_epoch": self.best_epoch,
                "history": self.history,
                "elapsed": self.elapsed,
            },
            path,
        )

    @classmethod
    def resume(
        cls, path: Path, net: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
    ) -> TrainState:
        """The state saved at ``path``, loaded into ``net``, ``optimizer`` and ``scaler``; the random
        generators are set as they were when it was saved."""
        saved = load_checkpoint(path)
        net.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        if "rng" in saved:
            set_rng_state(saved["rng"])
        return cls(
            net,
            optimizer,
            scaler,
            epochs_done=int(saved["epoch"]) + 1,
            best_dice=float(saved["best_dice"]),
            best_epoch=int(saved["best_epoch"]),
            history=list(saved["history"]),
            elapsed=float(saved["elapsed"]),
        )
