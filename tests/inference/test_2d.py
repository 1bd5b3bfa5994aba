"""The 2D path end to end on real EM sections: train briefly, segment a PNG, score it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import medunet
from medunet.config import load_config
from medunet.evaluation import evaluate_folders
from medunet.inference import expand_inputs, plan_jobs, run_jobs
from medunet.io import load_image
from medunet.training import TrainRequest, train

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_isbi_png_in_png_out(data_dir: Path, tmp_path: Path) -> None:
    overrides = {
        "train.epochs": 1,
        "preprocess.patch_size": [64, 64],
        "network.features": [8, 16, 32],
        "augment.crop_samples": 2,
        "infer.roi_size": [256, 256],
    }
    cfg = load_config(REPO / "configs" / "isbi_membrane_2d.yaml", overrides)
    result = train(TrainRequest(cfg, tmp_path / "run", device="cpu", progress=False))
    model = medunet.load_model(result.best_checkpoint)
    assert model.label_values == (255, 0)

    section = data_dir / "isbi2012_membrane" / "train" / "image" / "27.png"
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(section, scans / "27.png")
    jobs = plan_jobs(expand_inputs([str(scans)]), tmp_path / "masks", spatial_dims=2)
    assert [j.output.name for j in jobs] == ["27.png"]
    assert not run_jobs(jobs, model).failed
    mask = load_image(tmp_path / "masks" / "27.png", spatial_dims=2)
    assert mask.shape == (1, 512, 512)
    assert set(np.unique(mask.numpy()).tolist()) <= {0.0, 255.0}

    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(data_dir / "isbi2012_membrane" / "train" / "label" / "27.png", labels / "27.png")
    summary = evaluate_folders(tmp_path / "masks", labels, tmp_path / "report.csv", labels=[0, 255])
    assert summary[255]["dice_mean"] > 0.5  # cell interior, after one short epoch


# MONAI warns for each sampled slice without hippocampus: the slice manifest holds every slice of a volume
@pytest.mark.filterwarnings("ignore:Num foregrounds 0.*class balanced samples:UserWarning:monai.transforms.utils")
def test_2d_model_segments_a_volume_slice_by_slice(data_dir: Path, tmp_path: Path) -> None:
    rows = (REPO / "data_manifests" / "msd_hippocampus_2d_slices.csv").read_text().splitlines()
    keep = [r for r in rows[1:] if r.split(",")[2] in {"hippocampus_004", "hippocampus_006", "hippocampus_007"}]
    overrides = {"data.manifest": str(tmp_path / "subset.csv"), "train.epochs": 1, "network.features": [8, 16]}
    (tmp_path / "subset.csv").write_text(
        "\n".join([rows[0], *(r.replace("../../shared/data", str(data_dir)) for r in keep)]) + "\n"
    )
    cfg = load_config(REPO / "configs" / "hippocampus_2d_slices.yaml", overrides)
    model = medunet.load_model(train(TrainRequest(cfg, tmp_path / "run", device="cpu", progress=False)).best_checkpoint)
    volume = data_dir / "msd_hippocampus" / "images" / "hippocampus_004.nii.gz"
    seg = medunet.segment(volume, model)
    img = load_image(volume, spatial_dims=3)
    assert tuple(seg.labels.shape) == tuple(img.shape[1:])
    np.testing.assert_allclose(seg.affine, np.asarray(img.affine))
