"""Post-processing chosen on the validation cases after training, as nnU-Net does.

The trained model segments each validation volume through the same path as ``medunet infer``; the
largest-connected-component filter is kept when it raises the mean Dice over those volumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medunet.config import ExperimentConfig
from medunet.data import read_manifest
from medunet.evaluation import dice_from_counts, overlap_counts
from medunet.io import load_checkpoint, load_image, save_checkpoint

MIN_GAIN = 0.001  # mean Dice the filter must add to be kept


@dataclass(frozen=True)
class PostprocessChoice:
    largest_component: bool
    dice_without: float
    dice_with: float
    volumes: int

    def describe(self) -> str:
        verdict = "kept" if self.largest_component else "not kept"
        return (
            f"largest-component post-processing {verdict}: mean Dice {self.dice_without:.4f} without, "
            f"{self.dice_with:.4f} with, on {self.volumes} validation volumes"
        )


def choose_postprocessing(checkpoint: Path, cfg: ExperimentConfig) -> PostprocessChoice:
    """Decide ``infer.largest_component`` for ``checkpoint`` on its run's validation volumes and write
    the choice into the checkpoint (replaced atomically)."""
    import torch

    from medunet.inference.model import model_from_payload
    from medunet.inference.predictor import InferOptions, keep_largest_components, segment

    payload = load_checkpoint(checkpoint)
    model = model_from_payload(payload, str(checkpoint))
    split = json.loads((checkpoint.parent / "split.json").read_text())
    val_ids = set(split["val"])
    volumes: dict[str, tuple[tuple[Path, ...], Path]] = {}
    for case in read_manifest(cfg.data.manifest):
        if case.case_id in val_ids and case.label is not None:
            volumes.setdefault(case.volume_id, (case.images, case.label))  # a volume's slices share it
    n = model.preprocess.num_classes
    without, with_ = [], []
    for images, label_path in volumes.values():
        seg = segment(list(images), model, options=InferOptions(largest_component=False))
        label = load_image(label_path, spatial_dims=(2, 3))
        values = torch.round(label.as_tensor()[0]).to(torch.int64)
        truth = torch.zeros_like(values)
        for index, value in enumerate(model.label_values):
            truth[values == value] = index
        pred = seg.labels.to(torch.int64)
        without.append(dice_from_counts(overlap_counts(pred, truth, n)))
        with_.append(dice_from_counts(overlap_counts(keep_largest_components(pred, n).to(torch.int64), truth, n)))
    d0 = float(np.mean(np.nanmean(without, axis=0))) if without else float("nan")
    d1 = float(np.mean(np.nanmean(with_, axis=0))) if with_ else float("nan")
    keep = bool(with_) and d1 >= d0 + MIN_GAIN
    payload["infer"] = {**payload.get("infer", {}), "largest_component": keep}
    save_checkpoint(payload, checkpoint)
    return PostprocessChoice(keep, d0, d1, len(volumes))
