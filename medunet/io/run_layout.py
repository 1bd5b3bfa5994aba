"""The files of a training run folder (``medunet train --output RUN``) and of a cross-validation run.

Training writes them; inference, bundles and tracking read them. A cross-validation run
(``medunet train --folds K``) holds one run folder per fold, ``fold_k/``, and the summary of all.
"""

from __future__ import annotations

from pathlib import Path

BEST = "best.pt"  # the best epoch's model (``medunet.io.model_file``)
LAST = "last.pt"  # the last epoch's model and what resuming needs (optimizer, history, random state)
CONFIG = "config.yaml"  # the resolved experiment config
SPLIT = "split.json"  # the training and validation case ids
HISTORY = "history.json"  # one record per epoch
PLAN = "plan.yaml"  # the plan the config came from (``medunet plan``), when there was one

SUMMARY_JSON = "cv_summary.json"  # per-fold Dice and their mean and standard deviation
SUMMARY_CSV = "cv_summary.csv"
FOLD_RESULT = "fold_result.json"  # written last in a fold folder: the fold is complete


def fold_dir(output: Path, fold: int) -> Path:
    return output / f"fold_{fold}"


def fold_checkpoints(folder: Path) -> list[Path]:
    """``fold_k/best.pt`` of a cross-validation run (``medunet train --folds K``), in fold order."""
    found = [p for p in folder.glob(f"fold_*/{BEST}") if p.parent.name.removeprefix("fold_").isdigit()]
    return sorted(found, key=lambda p: int(p.parent.name.removeprefix("fold_")))
