"""Patient-wise splits and folds: every case of a patient lands on the same side."""

from __future__ import annotations

import random
from collections.abc import Sequence

from medunet.data.manifest import Case


def _patients(cases: Sequence[Case], seed: int) -> list[str]:
    patients = sorted({c.patient_id for c in cases})
    random.Random(seed).shuffle(patients)
    return patients


def split_by_patient(cases: Sequence[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split grouped by ``patient_id``.

    A ``split`` column in the manifest ("train"/"val") wins over the random split.
    """
    if any(c.split for c in cases):
        return _explicit(cases)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    patients = _patients(cases, seed)
    if len(patients) < 2:
        raise ValueError("a patient-wise split needs at least two patients")
    n_val = min(max(1, round(len(patients) * val_fraction)), len(patients) - 1)
    val_patients = set(patients[:n_val])
    return [c for c in cases if c.patient_id not in val_patients], [c for c in cases if c.patient_id in val_patients]


def kfold_by_patient(cases: Sequence[Case], folds: int, fold: int, seed: int) -> tuple[list[Case], list[Case]]:
    """Fold ``fold`` of ``folds`` (0-based): patients are dealt round-robin after a seeded shuffle."""
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds - 1}], got {fold}")
    patients = _patients(cases, seed)
    if len(patients) < folds:
        raise ValueError(f"{len(patients)} patients cannot fill {folds} folds")
    val_patients = set(patients[fold::folds])
    return [c for c in cases if c.patient_id not in val_patients], [c for c in cases if c.patient_id in val_patients]


def _explicit(cases: Sequence[Case]) -> tuple[list[Case], list[Case]]:
    train = [c for c in cases if c.split == "train"]
    val = [c for c in cases if c.split in ("val", "validation")]
    overlap = {c.patient_id for c in train} & {c.patient_id for c in val}
    if overlap:
        raise ValueError(f"manifest split puts patient(s) {sorted(overlap)[:5]} on both sides")
    if not train or not val:
        raise ValueError("the manifest's split column needs both 'train' and 'val' rows")
    return train, val
