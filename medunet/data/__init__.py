"""Manifests, patient-wise splits and folds."""

from medunet.data.manifest import Case, read_manifest
from medunet.data.splits import kfold_by_patient, split_by_patient

__all__ = ["Case", "kfold_by_patient", "read_manifest", "split_by_patient"]
