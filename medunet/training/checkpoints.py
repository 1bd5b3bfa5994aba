"""What a run writes: the model file (``best.pt``), the training state (``last.pt``) and ``history.json``.

Every file is written through a temporary file and renamed (``medunet.io``), so a process killed at
any moment leaves whole files only; ``prepare_output`` removes the temporary files such a kill left.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from medunet.config import ExperimentConfig, InferConfig, to_dict
from medunet.errors import InputError
from medunet.io import save_checkpoint
from medunet.io.model_file import ModelFile
from medunet.io.run_layout import BEST, HISTORY, LAST
from medunet.io.writers import write_text

if TYPE_CHECKING:
    from medunet.training.state import TrainState


# last.pt holds the weights and Adam's two moments; while it is replaced the old and the new copy
# coexist; best.pt holds the weights, twice during its replacement. Plus room for logs and pictures.
CHECKPOINT_COPIES = 8
SPARE_BYTES = 64 * 2**20


def infer_settings(cfg: ExperimentConfig) -> InferConfig:
    """The run's inference settings; mirroring for ``--tta`` only along the axes training flipped."""
    if cfg.infer.tta_axes or cfg.augment.flip_prob <= 0:
        return cfg.infer
    return replace(cfg.infer, tta_axes=tuple(cfg.augment.flip_axes))


def model_payload(cfg: ExperimentConfig, model: nn.Module, fingerprint: str | None = None) -> dict[str, Any]:
    """What inference needs and nothing else: network, preprocessing, labels, window and weights, and
    the training data's ``fingerprint`` (JSON text) when the run was planned from a dataset. The layout
    is ``medunet.io.model_file.ModelFile``'s."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return ModelFile(cfg.network, cfg.preprocess, infer_settings(cfg), weights, fingerprint).to_payload()


def weight_bytes(net: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in net.parameters())


def prepare_output(out: Path, weights: int, resume: bool = False) -> None:
    """Create ``out`` and prove it writable with room for the checkpoints, before any data is read.

    Files left by a process killed while writing (``.*.tmp*``) are removed: the real files are whole.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise InputError(out, f"output folder is not writable ({exc.strerror or exc})") from None
    for stale in out.glob(".*.tmp*"):
        stale.unlink()
    need = CHECKPOINT_COPIES * weights + SPARE_BYTES
    if resume:  # the checkpoints being replaced are already on the disk
        need -= sum(p.stat().st_size for p in (out / LAST, out / BEST) if p.exists())
    free = shutil.disk_usage(out).free
    if free < need:
        raise InputError(
            out, f"only {free / 2**20:.0f} MiB free on this disk; checkpoints need about {need / 2**20:.0f} MiB"
        )


class Checkpointer:
    """Writes a run's ``best.pt`` (the model file), ``last.pt`` (model file plus training state) and
    ``history.json`` into ``output``; on ranks other than 0 (``writes=False``) it writes nothing."""

    def __init__(self, cfg: ExperimentConfig, output: Path, writes: bool = True) -> None:
        self.cfg, self.writes = cfg, writes
        self.best_path, self.last_path, self.history_path = output / BEST, output / LAST, output / HISTORY
        fp = cfg.data.fingerprint
        self.fingerprint = fp.read_text() if fp is not None and fp.is_file() else None  # into each checkpoint

    def model_file(self, net: nn.Module) -> dict[str, Any]:
        return model_payload(self.cfg, net, self.fingerprint)

    def save_best(self, net: nn.Module, epoch: int, dice: float) -> None:
        """``best.pt``: the model file of the (0-based) ``epoch`` whose validation Dice is ``dice``."""
        if self.writes:
            save_checkpoint({**self.model_file(net), "epoch": epoch, "dice": dice}, self.best_path)

    def save_last(self, state: TrainState) -> None:
        """``last.pt`` (the model file, the config and the training state), then ``history.json``."""
        if not self.writes:
            return
        state.save(self.last_path, {**self.model_file(state.net), "config": to_dict(self.cfg)})
        write_text(self.history_path, json.dumps(state.history, indent=1))
