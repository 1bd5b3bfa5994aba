"""Per-case, per-class Dice and HD95 of predicted masks against reference labels, as CSV."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medunet.errors import InputError
from medunet.evaluation.metrics import dice_per_class, hd95_per_class
from medunet.io import load_image
from medunet.io.readers import SUPPORTED, has_suffix
from medunet.io.writers import atomic_path


@dataclass(frozen=True)
class CaseScore:
    case: str
    label: int
    dice: float
    hd95: float
    pixel_error: float  # share of voxels whose label differs, whatever the class


def pair_files(pred_dir: Path, label_dir: Path) -> list[tuple[Path, Path]]:
    """Predictions and labels matched by file name; a prediction without a label is an error."""
    for d in (pred_dir, label_dir):
        if not d.is_dir():
            raise InputError(d, "no such folder")
    preds = sorted(p for p in pred_dir.iterdir() if has_suffix(p, SUPPORTED) and not p.name.startswith("."))
    preds = [p for p in preds if "_probs." not in p.name]
    if not preds:
        raise InputError(pred_dir, "holds no masks")
    pairs = []
    for p in preds:
        label = label_dir / p.name
        if not label.exists():
            raise InputError(label, f"no reference label for prediction {p.name}")
        pairs.append((p, label))
    return pairs


def score_case(pred_path: Path, label_path: Path, labels: list[int] | None = None) -> list[CaseScore]:
    """Dice and HD95 (mm) for each label value present in either map (or each of ``labels``)."""
    pred = load_image(pred_path)
    ref = load_image(label_path)
    if tuple(pred.shape) != tuple(ref.shape) or not np.allclose(pred.affine, ref.affine, atol=1e-3):
        raise InputError(pred_path, f"geometry {tuple(pred.shape[1:])} does not match label {label_path}")
    p, r = torch.round(pred[0]).long(), torch.round(ref[0]).long()
    values = labels or sorted(int(v) for v in torch.unique(torch.cat([p.flatten(), r.flatten()])) if v != 0)
    spacing = [float(s) for s in pred.pixdim[: p.dim()]]
    error = float((p != r).float().mean())
    scores = []
    for v in values:
        pv, rv = (p == v).to(torch.uint8), (r == v).to(torch.uint8)
        dice = float(dice_per_class(pv, rv, 2)[0])
        hd = float(hd95_per_class(pv, rv, 2, spacing)[0]) if pv.any() and rv.any() else math.nan
        scores.append(CaseScore(pred_path.name, v, dice, hd, error))
    return scores


def evaluate_folders(
    pred_dir: Path, label_dir: Path, output: Path, labels: list[int] | None = None
) -> dict[int, dict[str, float]]:
    """Score every prediction, write ``output`` (per case and class) and ``<output>_summary.csv``.

    Returns ``{label: {"dice_mean", "dice_std", "hd95_mean", "n"}}``.
    """
    scores = [s for pred, ref in pair_files(pred_dir, label_dir) for s in score_case(pred, ref, labels)]
    with atomic_path(output) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "label", "dice", "hd95_mm", "pixel_error"])
        w.writerows([s.case, s.label, f"{s.dice:.4f}", f"{s.hd95:.3f}", f"{s.pixel_error:.5f}"] for s in scores)
    summary: dict[int, dict[str, float]] = {}
    for v in sorted({s.label for s in scores}):
        dice = np.array([s.dice for s in scores if s.label == v])
        hd = np.array([s.hd95 for s in scores if s.label == v])
        summary[v] = {
            "dice_mean": float(dice.mean()),
            "dice_std": float(dice.std()),
            "dice_min": float(dice.min()),
            "hd95_mean": float(np.nanmean(hd)) if np.isfinite(hd).any() else math.nan,
            "pixel_error": float(np.mean([s.pixel_error for s in scores if s.label == v])),
            "n": float(len(dice)),
        }
    summary_path = output.with_name(output.stem + "_summary.csv")
    with atomic_path(summary_path) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["label", "n", "dice_mean", "dice_std", "dice_min", "hd95_mean_mm", "pixel_error"])
        for v, s in summary.items():
            w.writerow(
                [
                    v,
                    int(s["n"]),
                    f"{s['dice_mean']:.4f}",
                    f"{s['dice_std']:.4f}",
                    f"{s['dice_min']:.4f}",
                    f"{s['hd95_mean']:.3f}",
                    f"{s['pixel_error']:.5f}",
                ]
            )
    return summary
