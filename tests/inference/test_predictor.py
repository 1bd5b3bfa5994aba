"""Inference keeps the input's geometry exactly, in every format and orientation."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import medunet
from medunet.errors import InputError
from medunet.inference import expand_inputs, plan_jobs, run_jobs, write_segmentation
from medunet.io import load_image
from tests.conftest import make_blob_case


def assert_same_grid(a: Path, b: Path) -> None:
    ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert ia.GetSize() == ib.GetSize()
    np.testing.assert_allclose(ia.GetSpacing(), ib.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(ia.GetOrigin(), ib.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ia.GetDirection(), ib.GetDirection(), atol=1e-6)


@pytest.mark.slow
def test_dicom_series_mask_overlays_the_scan(tiny_model: Path, data_dir: Path, tmp_path: Path) -> None:
    model = medunet.load_model(tiny_model)
    seg = medunet.segment(data_dir / "totalseg_examples" / "example_ct_dicom", model)
    out = write_segmentation(seg, model, tmp_path / "mask.nii.gz")
    assert_same_grid(out, data_dir / "totalseg_examples" / "derived" / "example_ct_dicom.nii.gz")
    assert nib.load(out).get_data_dtype() == np.uint8


@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, 1, 1), (-1, -1, 1)])
def test_any_orientation_maps_back(tiny_model: Path, tmp_path: Path, flip: tuple) -> None:
    theta = 0.3
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(np.array(flip) * [0.8, 1.1, 2.5])
    affine[:3, 3] = [12.0, -40.0, 7.5]
    img, lab = make_blob_case(tmp_path, "oblique", seed=11, affine=affine)
    model = medunet.load_model(tiny_model)
    out = write_segmentation(medunet.segment(img, model), model, tmp_path / "mask.nii.gz")
    assert_same_grid(out, img)
    # the mask lands on the blobs, not on a flipped or shifted copy of them
    mask = np.asarray(nib.load(out).dataobj)
    truth = np.asarray(nib.load(lab).dataobj)
    assert ((mask > 0) & (truth > 0)).sum() > 0.5 * (truth > 0).sum()


def test_probabilities(tiny_model: Path, tmp_path: Path) -> None:
    img, _ = make_blob_case(tmp_path, "p", seed=3)
    seg = medunet.segment(img, medunet.load_model(tiny_model), probabilities=True)
    assert seg.probabilities is not None and seg.probabilities.shape == (3, 24, 28, 20)
    assert seg.probabilities.dtype == torch.float16  # K x volume in half precision: large scans stay in budget
    torch.testing.assert_close(seg.probabilities.float().sum(0), torch.ones(24, 28, 20), atol=3e-3, rtol=0)
    agree = (seg.probabilities.argmax(0).to(torch.uint8) == seg.labels).float().mean()
    assert agree > 0.99  # float16 rounding may tie two classes where the model is unsure


def test_smaller_than_window_and_single_slice(tiny_model: Path, tmp_path: Path) -> None:
    model = medunet.load_model(tiny_model)
    for shape in [(5, 6, 7), (30, 30, 1)]:
        path = tmp_path / f"s{shape[2]}.nii.gz"
        nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=shape).astype(np.float32), np.eye(4)), path)
        assert medunet.segment(path, model).labels.shape == shape  # padded to the window, cropped back


def test_folder_of_scans_skips_bad_files(tiny_model: Path, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    for i in range(2):
        make_blob_case(scans, f"case{i}", seed=i)
    for p in scans.glob("*_lab.nii.gz"):
        p.unlink()
    (scans / "broken.nii.gz").write_bytes(b"garbage")
    model = medunet.load_model(tiny_model)
    jobs = plan_jobs(expand_inputs([str(scans)]), tmp_path / "masks", 3)
    assert sorted(j.output.name for j in jobs) == ["broken.nii.gz", "case0_img.nii.gz", "case1_img.nii.gz"]
    result = run_jobs(jobs, model)
    assert len(result.written) == 2 and len(result.failed) == 1
    assert "broken.nii.gz: cannot be read" in result.failed[0][1]
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["case0_img.nii.gz", "case1_img.nii.gz"]
    again = run_jobs([j for j in jobs if "broken" not in j.name], model, skip_existing=True)
    assert len(again.skipped) == 2 and not again.written


def test_wrong_channel_count(tiny_model: Path, tmp_path: Path) -> None:
    a, _ = make_blob_case(tmp_path, "a", seed=1)
    b, _ = make_blob_case(tmp_path, "b", seed=2)
    with pytest.raises(InputError, match="has 2 channel"):
        medunet.segment(load_image([a, b], 3), medunet.load_model(tiny_model))
