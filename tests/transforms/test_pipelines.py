"""Pipelines on real cases: 3D, 2D slices of 3D volumes, multi-channel, 2D PNG."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import get_track_meta
from monai.transforms import Compose

from medunet.config import AugmentConfig, Normalization, PreprocessConfig
from medunet.data import read_manifest
from medunet.errors import InputError
from medunet.transforms import (
    LoadCased,
    augment_transform,
    inference_transform,
    preprocess_transform,
    training_transform,
)

REPO = Path(__file__).resolve().parents[2]


def test_hippocampus_3d_train_pipeline(data_dir: Path) -> None:
    case = read_manifest(REPO / "data_manifests" / "msd_hippocampus_3d.csv")[0]
    pre = PreprocessConfig(label_names=("bg", "a", "p"), patch_size=(40, 56, 40))
    d = preprocess_transform(pre, pad_to_patch=True)(case.as_item())
    assert d["image"].shape[0] == 1 and d["label"].dtype == torch.uint8
    assert abs(float(d["image"].mean())) < 0.05  # z-scored
    aug = AugmentConfig(crop_samples=2, elastic_prob=1.0, flip_prob=0.5, flip_axes=(0,), intensity_prob=1.0)
    crops = augment_transform(pre, aug)(d)
    assert len(crops) == 2
    assert crops[0]["image"].shape == (1, 40, 56, 40) and crops[0]["label"].shape == (1, 40, 56, 40)
    assert set(torch.unique(crops[0]["label"]).tolist()) <= {0, 1, 2}


def test_training_draws_are_those_of_the_metadata_tracked_steps_as_plain_tensors(data_dir: Path) -> None:
    case = read_manifest(REPO / "data_manifests" / "msd_hippocampus_3d.csv")[0]
    pre = PreprocessConfig(label_names=("bg", "a", "p"), patch_size=(40, 56, 40))
    aug = AugmentConfig(rotate_prob=1.0, elastic_prob=1.0, flip_prob=0.5, flip_axes=(0, 1), intensity_prob=1.0)
    tf = training_transform(pre, aug)
    *cached, random_steps = tf.transforms
    tracked = Compose([*cached, *random_steps.transforms])
    item = Compose(cached)(case.as_item())
    for seed in range(3):
        (fast,) = random_steps.set_random_state(seed=seed)(dict(item))  # one crop
        (slow,) = Compose(tracked.transforms[len(cached) :]).set_random_state(seed=seed)(dict(item))
        for key in ("image", "label"):
            assert type(fast[key]) is torch.Tensor
            torch.testing.assert_close(fast[key], torch.as_tensor(slow[key]))
    assert get_track_meta()  # switched back on
    with pytest.raises(RuntimeError, match="RandCropByPosNegLabeld"):  # no label to crop by
        random_steps({"image": item["image"]})
    assert get_track_meta()  # also after an error


def test_slice_view_matches_volume(data_dir: Path) -> None:
    cases = read_manifest(REPO / "data_manifests" / "msd_hippocampus_2d_slices.csv")
    case = next(c for c in cases if c.slice_index == 15)
    pre = PreprocessConfig(spatial_dims=2, normalization=Normalization.NONE, label_names=("bg", "a", "p"))
    d = preprocess_transform(pre, pad_to_patch=False, volume_dims=3)(case.as_item())
    vol = np.asarray(nib.load(case.images[0]).dataobj)
    lab = np.asarray(nib.load(case.label).dataobj)
    assert d["image"].shape == (1, *vol.shape[:2])
    np.testing.assert_allclose(d["image"][0].numpy(), vol[:, :, 15])
    np.testing.assert_array_equal(d["label"][0].numpy(), lab[:, :, 15])


def test_slice_items_are_normalized_over_their_volume(data_dir: Path) -> None:
    cases = read_manifest(REPO / "data_manifests" / "msd_hippocampus_2d_slices.csv")[:40]
    pre = PreprocessConfig(spatial_dims=2, label_names=("bg", "a", "p"))
    tf = preprocess_transform(pre, pad_to_patch=False, volume_dims=3)
    same_volume = [tf(c.as_item())["image"] for c in cases if c.volume_id == cases[0].volume_id]
    stacked = torch.stack([s[0] for s in same_volume], dim=-1)
    assert abs(float(stacked.mean())) < 1e-3 and abs(float(stacked.std()) - 1.0) < 1e-2


def test_brats_two_channels_with_nonzero_zscore(data_dir: Path) -> None:
    case = read_manifest(REPO / "data_manifests" / "brats2015_3d.csv")[0]
    pre = PreprocessConfig(channels=("flair", "t1c"), label_names=("bg", "n", "o", "ne", "e"), nonzero=True)
    d = preprocess_transform(pre, pad_to_patch=False)(case.as_item())
    assert d["image"].shape == (2, 240, 240, 155)
    assert set(torch.unique(d["label"]).tolist()) <= {0, 1, 2, 3, 4}


def test_isbi_label_map(data_dir: Path) -> None:
    case = read_manifest(REPO / "data_manifests" / "isbi2012_membrane_2d.csv")[0]
    d = LoadCased(spatial_dims=2, label_map=((255, 0), (0, 1)))(case.as_item())
    frac = float((d["label"] == 1).float().mean())
    assert 0.15 < frac < 0.3  # membrane is about 22% of the pixels
    with pytest.raises(InputError, match="not all in label_map"):
        LoadCased(spatial_dims=2, label_map=((255, 0),))(case.as_item())


def test_ct_window_and_resampling_invert(data_dir: Path) -> None:
    from medunet.io import load_image

    img = load_image(data_dir / "totalseg_examples" / "example_ct_sm.nii.gz", spatial_dims=3)
    pre = PreprocessConfig(normalization=Normalization.CT, ct_window=(-200.0, 300.0), target_spacing=(1.5, 1.5, 1.5))
    tf = inference_transform(pre)
    x = tf({"image": img})["image"]
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert x.shape[1] == pytest.approx(img.shape[1] * 2, abs=2)  # 3 mm -> 1.5 mm
    back = tf.inverse({"image": x})["image"]
    assert back.shape == img.shape
    np.testing.assert_allclose(np.asarray(back.affine), np.asarray(img.affine), atol=1e-4)
