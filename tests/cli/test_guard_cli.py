"""The input guard from the command line: a warning and a flags column, or with --strict a refusal."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

MEDUNET = [sys.executable, "-m", "medunet"]


@pytest.mark.slow
def test_a_ct_scan_into_the_mri_model_is_flagged_and_strict_refuses_it(data_dir: Path, tmp_path: Path) -> None:
    ct = data_dir / "totalseg_examples" / "example_ct_sm.nii.gz"
    hippo = data_dir / "msd_hippocampus" / "images" / "hippocampus_004.nii.gz"
    stats = tmp_path / "stats.csv"
    proc = subprocess.run(
        [*MEDUNET, "infer", str(ct), str(hippo), "-o", str(tmp_path / "masks"), "--stats", str(stats), "-q"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("medunet: warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"medunet: warning: {ct}: unlike the training data: ")
    assert "this looks like a CT scan" in warnings[0]
    with open(stats, newline="") as f:
        flags = {row["scan"]: row["flags"] for row in csv.DictReader(f)}
    assert flags == {"example_ct_sm": "modality;size;spacing", "hippocampus_004": ""}

    out = tmp_path / "strict.nii.gz"
    proc = subprocess.run(
        [*MEDUNET, "infer", str(ct), "-o", str(out), "--strict", "-q"], capture_output=True, text=True
    )
    assert proc.returncode == 1 and not out.exists()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("medunet:")]
    assert len(errors) == 1 and errors[0].startswith(f"medunet: error: {ct}: refused (--strict): unlike the training")


def test_a_blank_scan_is_refused_with_strict(data_dir: Path, tmp_path: Path) -> None:
    ref = nib.load(data_dir / "msd_hippocampus" / "images" / "hippocampus_004.nii.gz")
    blank = tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(ref.shape, np.float32), ref.affine), blank)
    out = tmp_path / "mask.nii.gz"
    proc = subprocess.run(
        [*MEDUNET, "infer", str(blank), "-o", str(out), "-q", "--strict"], capture_output=True, text=True
    )
    assert proc.returncode == 1 and not out.exists()
    assert [
        line for line in proc.stderr.splitlines() if line.startswith("medunet:")
    ] == [  # after "using the default model"
        f"medunet: error: {blank}: refused (--strict): unlike the training data: "
        "every voxel holds the same value (0): nothing to segment"
    ]
