from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medunet.errors import InputError
from medunet.evaluation import dice_from_counts, dice_per_class, evaluate_folders, hd95_per_class, overlap_counts


def test_dice_known_values() -> None:
    pred = torch.zeros(10, 10, dtype=torch.uint8)
    label = torch.zeros(10, 10, dtype=torch.uint8)
    pred[:4, :5] = 1  # 20 voxels
    label[:2, :5] = 1  # 10 voxels, all inside pred
    pred[8:, 8:] = 2  # class 2 only in the prediction
    d = dice_per_class(pred, label, 3)
    np.testing.assert_allclose(d, [2 * 10 / 30, 0.0], atol=1e-6)
    np.testing.assert_allclose(dice_from_counts(overlap_counts(pred, label, 3)), d, atol=1e-6)
    empty = torch.zeros(4, 4, dtype=torch.uint8)
    np.testing.assert_allclose(dice_per_class(empty, empty, 3), [1.0, 1.0])


def test_counts_pool_slices_into_volume_dice() -> None:
    rng = np.random.default_rng(0)
    pred = torch.as_tensor(rng.integers(0, 3, (6, 8, 5)))
    label = torch.as_tensor(rng.integers(0, 3, (6, 8, 5)))
    pooled = sum(overlap_counts(pred[..., z], label[..., z], 3) for z in range(5))
    np.testing.assert_allclose(dice_from_counts(pooled), dice_per_class(pred, label, 3), atol=1e-6)


def test_hd95_in_mm() -> None:
    a = torch.zeros(20, 20, 20, dtype=torch.uint8)
    b = torch.zeros(20, 20, 20, dtype=torch.uint8)
    a[5:10, 5:10, 5:10] = 1
    b[5:10, 5:10, 7:12] = 1  # shifted by 2 voxels along z
    assert hd95_per_class(a, b, 2)[0] == pytest.approx(2.0)
    assert hd95_per_class(a, b, 2, spacing=(1.0, 1.0, 3.0))[0] == pytest.approx(6.0)


def test_evaluate_folders_on_real_labels(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "pyradiomics_cases" / "prostate_phantom_subvolume-label.nrrd"
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    shutil.copy(src, ref / "phantom.nrrd")
    shutil.copy(src, pred / "phantom.nrrd")
    summary = evaluate_folders(pred, ref, tmp_path / "report.csv")
    assert sorted(summary) == [1, 7, 8, 9]
    assert all(s["dice_mean"] == pytest.approx(1.0) and s["hd95_mean"] == pytest.approx(0.0) for s in summary.values())
    rows = (tmp_path / "report.csv").read_text().splitlines()
    assert rows[0] == "case,label,dice,hd95_mm,pixel_error" and len(rows) == 5
    assert (tmp_path / "report_summary.csv").read_text().startswith("label,n,dice_mean")


def test_evaluate_refuses_other_geometry(tmp_path: Path) -> None:
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), pred / "a.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 5), np.uint8), np.eye(4)), ref / "a.nii.gz")
    with pytest.raises(InputError, match="does not match label"):
        evaluate_folders(pred, ref, tmp_path / "r.csv")
    assert not (tmp_path / "r.csv").exists()
