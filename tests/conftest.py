"""Shared fixtures: the real data in ../shared/data and tiny generated volumes."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDUNET_TEST_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    # Scans segmented inside this process are planned against a fixed 4 GiB rather than the default
    # (a quarter of the machine, at most 2 GiB, less what the process holds): by the end of the suite
    # the process holds every test's libraries (OpenVINO, ONNX Runtime, the ONNX exporter), about
    # 1.6 GiB, which left no room under 2 GiB. The command runs the tests start keep the real default.
    from medunet.inference import predictor

    predictor.default_memory_budget = lambda: 4 * 1024**3


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA} (set MEDUNET_TEST_DATA)")
    return DATA


def make_blob_case(folder: Path, name: str, shape=(24, 28, 20), seed: int = 0, affine=None) -> tuple[Path, Path]:
    """A tiny 3D image with two labelled blobs whose intensities differ from the background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float32)
    c1 = np.array(shape) * rng.uniform(0.3, 0.45, 3)
    c2 = np.array(shape) * rng.uniform(0.55, 0.7, 3)
    label = np.zeros(shape, np.uint8)
    label[np.linalg.norm(grid - c1, axis=-1) < 4.5] = 1
    label[np.linalg.norm(grid - c2, axis=-1) < 4.0] = 2
    image = rng.normal(100, 10, shape).astype(np.float32) + 60.0 * (label == 1) + 120.0 * (label == 2)
    affine = np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine
    folder.mkdir(parents=True, exist_ok=True)
    img_p, lab_p = folder / f"{name}_img.nii.gz", folder / f"{name}_lab.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(img_p))
    nib.save(nib.Nifti1Image(label, affine), str(lab_p))
    return img_p, lab_p


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """``mlflow.set_tracking_uri`` also sets ``$MLFLOW_TRACKING_URI``; undo it after each test so that a
    server started by one test is not what the commands of the next one talk to."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def blob_manifest(tmp_path: Path) -> Path:
    """A manifest of 8 tiny generated cases from 4 patients (two scans each)."""
    rows = ["image,label,patient_id"]
    for i in range(8):
        img, lab = make_blob_case(tmp_path / "cases", f"c{i}", seed=i)
        rows.append(f"cases/{img.name},cases/{lab.name},p{i // 2}")
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def tiny_config(tmp_path: Path, blob_manifest: Path) -> Path:
    """A 3D config that trains in seconds on the blob manifest."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_YAML.format(manifest=blob_manifest.name))
    return cfg


TINY_YAML = """
name: tiny
data: {{manifest: {manifest}, val_fraction: 0.25, split_seed: 0}}
preprocess:
  spatial_dims: 3
  label_names: [background, one, two]
  normalization: zscore
  patch_size: [16, 16, 16]
augment: {{crop_samples: 1, rotate_prob: 0.2, intensity_prob: 0.2}}
network: {{name: unet, spatial_dims: 3, out_channels: 3, features: [8, 16, 32]}}
train: {{epochs: 3, batch_size: 2, learning_rate: 0.01, seed: 0}}
infer: {{overlap: 0.25, sw_batch_size: 1, roi_size: [96, 96, 32]}}
"""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3D checkpoint trained for a few epochs on generated blobs (shared by inference tests)."""
    from medunet.config import load_config
    from medunet.training import TrainRequest, train

    root = tmp_path_factory.mktemp("tiny_model")
    rows = ["image,label,patient_id"]
    for i in range(6):
        img, lab = make_blob_case(root / "cases", f"c{i}", seed=i)
        rows.append(f"cases/{img.name},cases/{lab.name},p{i}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    overrides = {"data.manifest": "manifest.csv", "train.epochs": 8, "train.val_every": 8}
    cfg = load_config(_write_tiny_yaml(root), overrides)
    return train(TrainRequest(cfg, root / "run", device="cpu", progress=False)).best_checkpoint


def _write_tiny_yaml(folder: Path) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(TINY_YAML.format(manifest="manifest.csv"))
    return path
