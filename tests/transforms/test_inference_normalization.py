"""Inference normalizes in place, with values identical to MONAI's transforms that training used."""

from __future__ import annotations

from pathlib import Path

import torch
from monai.transforms import NormalizeIntensityd, ScaleIntensityRanged

import medunet
from medunet.config import Normalization, PreprocessConfig
from medunet.io import load_image
from medunet.transforms.pipelines import InPlaceIntensityd


def test_zscore_in_place_equals_monai(data_dir: Path) -> None:
    img = load_image(data_dir / "msd_hippocampus" / "images" / "hippocampus_004.nii.gz", 3)
    ref = NormalizeIntensityd(keys="image", nonzero=False, channel_wise=True)({"image": img.clone()})["image"]
    x = img.clone()
    ours = InPlaceIntensityd(PreprocessConfig(normalization=Normalization.ZSCORE))({"image": x})["image"]
    assert torch.equal(torch.as_tensor(ref), torch.as_tensor(ours))
    assert ours.data_ptr() == x.data_ptr()  # no copy


def test_ct_window_in_place_equals_monai(data_dir: Path) -> None:
    ct = load_image(data_dir / "totalseg_examples" / "example_ct.nii.gz", 3)
    cfg = PreprocessConfig(normalization=Normalization.CT, ct_window=(-200.0, 300.0))
    lo, hi = cfg.ct_window
    monai_ct = ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    ref = monai_ct({"image": ct.clone()})["image"]
    ours = InPlaceIntensityd(cfg)({"image": ct.clone()})["image"]
    assert torch.equal(torch.as_tensor(ref), torch.as_tensor(ours))


def test_segmenting_a_loaded_image_leaves_it_unchanged(tiny_model: Path, data_dir: Path) -> None:
    img = load_image(data_dir / "msd_hippocampus" / "images" / "hippocampus_004.nii.gz", 3)
    before = img.clone()
    medunet.segment(img, medunet.load_model(tiny_model))
    assert torch.equal(img.as_tensor(), before.as_tensor())
