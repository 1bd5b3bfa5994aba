"""The bundles shipped in bundles/: sound, and the default one segments the shipped example well."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medunet.bundle import list_bundles, verify_bundle
from medunet.evaluation import score_case
from medunet.inference.model import DEFAULT_BUNDLE, bundles_root

REPO = Path(__file__).resolve().parents[2]
SHIPPED = list_bundles(REPO / "bundles")


def test_default_bundle_is_shipped() -> None:
    assert bundles_root() == REPO / "bundles"
    assert DEFAULT_BUNDLE in [b.name for b in SHIPPED]


@pytest.mark.parametrize("bundle", SHIPPED, ids=lambda b: b.name)
def test_shipped_bundle_verifies(bundle) -> None:  # type: ignore[no-untyped-def]
    assert verify_bundle(bundle.path) == []
    assert (bundle.path / "models" / "model.pt").stat().st_size < 20 * 2**20


def test_infer_without_model_uses_default(tmp_path: Path) -> None:
    mask = tmp_path / "mask.nii.gz"
    proc = subprocess.run(
        [sys.executable, "-m", "medunet", "infer", str(REPO / "examples" / "hippocampus_017.nii.gz"), "-o", str(mask)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {mask}" in proc.stdout and "default model" in proc.stderr
    scores = {s.label: s.dice for s in score_case(mask, REPO / "examples" / "hippocampus_017_label.nii.gz")}
    assert scores[1] > 0.8 and scores[2] > 0.8


def test_cardiac_bundle_segments_a_validation_frame_on_its_grid(data_dir: Path, tmp_path: Path) -> None:
    """The planned ACDC bundle on a frame of a patient it never trained on: the mask is on the frame's
    grid and every structure is found."""
    import json
    import re

    import nibabel as nib

    bundle = REPO / "bundles" / "acdc_cardiac_mri_3d"
    split = json.loads((bundle / "configs" / "split.json").read_text())
    frame = sorted({re.sub(r"_z\d{3}$", "", c) for c in split["val"]})[0]
    scan = data_dir / "acdc_cardiac" / "imagesTr" / f"{frame}_0000.nii.gz"
    label = data_dir / "acdc_cardiac" / "labelsTr" / f"{frame}.nii.gz"
    mask = tmp_path / "mask.nii.gz"
    proc = subprocess.run(
        [sys.executable, "-m", "medunet", "infer", str(scan), "-o", str(mask), "--model", str(bundle), "-q"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    out, ref = nib.load(str(mask)), nib.load(str(scan))
    assert out.shape == ref.shape and (out.affine == ref.affine).all()
    scores = {s.label: s.dice for s in score_case(mask, label)}
    assert set(scores) == {1, 2, 3} and min(scores.values()) > 0.8, scores
    assert (bundle / "configs" / "fingerprint.json").is_file() and (bundle / "configs" / "plan.yaml").is_file()
