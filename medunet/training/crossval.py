"""Cross-validation by patient: one model per fold, a per-fold and mean summary, and fold ensembles.

``medunet train --folds K`` trains fold ``k`` of ``K`` into ``OUTPUT/fold_k`` (validation patients
``patients[k::K]`` after a seeded shuffle, so every patient is validated exactly once) and writes
``OUTPUT/cv_summary.json`` and ``OUTPUT/cv_summary.csv``. The fold models are averaged at inference
(``medunet infer --model OUTPUT``), and ``medunet bundle build --run OUTPUT`` packs all of them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from medunet.config import ExperimentConfig
from medunet.io.run_layout import FOLD_RESULT, SUMMARY_CSV, SUMMARY_JSON, fold_dir
from medunet.io.writers import atomic_path, write_text
from medunet.training.loop import TrainRequest, TrainResult, train

log = logging.getLogger(__name__)

# Called with (fold's config, fold folder): a context the fold trains inside (a tracking run), yielding its
# epoch hook.
FoldHooks = Callable[[ExperimentConfig, Path], AbstractContextManager[Callable[[dict[str, Any]], None] | None]]


def cross_validate(
    cfg: ExperimentConfig,
    output: Path,
    folds: int,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    hooks: FoldHooks | None = None,
    is_main: bool = True,
) -> dict[str, Any]:
    """Train every fold and return the summary (also written to ``output``).

    With ``resume``, complete folds are kept and an interrupted one continues from its ``last.pt``.
    """
    if folds < 2:
        raise ValueError(f"--folds needs at least 2 folds, got {folds}")
    output.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for k in range(folds):
        out = fold_dir(output, k)
        done = out / FOLD_RESULT
        if resume and done.is_file():
            log.info("fold %d of %d already complete in %s", k, folds, out)
            results.append(json.loads(done.read_text()))
            continue
        log.info("fold %d of %d -> %s", k, folds, out)
        fold_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, folds=folds, fold=k))
        with hooks(fold_cfg, out) if hooks else nullcontext(None) as on_epoch:
            result = train(TrainRequest(fold_cfg, out, resume=resume, device=device, progress=progress), on_epoch)
        record = fold_record(k, result)
        if is_main:
            write_text(done, json.dumps(record, indent=1))
        results.append(record)
    summary = summarize(results, cfg.preprocess.label_names[1:])
    if is_main:
        write_text(output / SUMMARY_JSON, json.dumps(summary, indent=1))
        write_summary_csv(output / SUMMARY_CSV, summary)
    return summary


def fold_record(fold: int, result: TrainResult) -> dict[str, Any]:
    return {
        "fold": fold,
        "best_epoch": result.best_epoch,
        "dice_mean": result.best_dice,
        "dice": result.class_dice,
        "epochs_run": result.epochs_run,
        "minutes": result.seconds / 60,
        "checkpoint": str(result.best_checkpoint),
    }


def summarize(results: list[dict[str, Any]], classes: tuple[str, ...]) -> dict[str, Any]:
    """Per-fold Dice per class, and the mean and standard deviation over folds."""
    table = np.array([[r["dice"][c] for c in classes] for r in results])
    means = np.array([r["dice_mean"] for r in results])
    return {
        "folds": results,
        "mean": {c: float(v) for c, v in zip(classes, table.mean(0), strict=True)} | {"mean": float(means.mean())},
        "std": {c: float(v) for c, v in zip(classes, table.std(0), strict=True)} | {"mean": float(means.std())},
    }


def write_summary_csv(path: Path, summary: dict[str, Any]) -> None:
    classes = [c for c in summary["mean"] if c != "mean"]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fold", *[f"dice_{c}" for c in classes], "dice_mean", "best_epoch"])
        for r in summary["folds"]:
            w.writerow([r["fold"], *[f"{r['dice'][c]:.4f}" for c in classes], f"{r['dice_mean']:.4f}", r["best_epoch"]])
        for stat in ("mean", "std"):
            row = summary[stat]
            w.writerow([stat, *[f"{row[c]:.4f}" for c in classes], f"{row['mean']:.4f}", ""])


def format_summary(summary: dict[str, Any]) -> str:
    classes = [c for c in summary["mean"] if c != "mean"]
    lines = ["fold  " + "  ".join(f"{c:>10}" for c in [*classes, "mean"])]
    for r in summary["folds"]:
        cells = [r["dice"][c] for c in classes] + [r["dice_mean"]]
        lines.append(f"{r['fold']:>4}  " + "  ".join(f"{v:>10.4f}" for v in cells))
    m, s = summary["mean"], summary["std"]
    lines.append("mean  " + "  ".join(f"{m[c]:>10.4f}" for c in [*classes, "mean"]))
    lines.append(" std  " + "  ".join(f"{s[c]:>10.4f}" for c in [*classes, "mean"]))
    return "\n".join(lines)
