"""Bundles: built from a run, accepted by MONAI's own tooling, loaded by medunet without running code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import medunet
from medunet.bundle import ModelCard, build_bundle, list_bundles, schema_path, verify_bundle
from medunet.errors import InputError
from medunet.inference import write_segmentation
from medunet.io import load_image
from tests.conftest import make_blob_case


def monai_bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def bundle(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundles")
    card = ModelCard(task="Blob segmentation", description="Test model.", data_source="generated", data_license="none")
    return build_bundle(tiny_model.parent, root / "blobs", card, command="medunet train --config tiny.yaml")


def test_layout_and_verify(bundle: Path) -> None:
    for f in [
        "configs/metadata.json",
        "configs/inference.json",
        "configs/train.json",
        "configs/evaluate.json",
        "configs/recipe.yaml",
        "models/model.pt",
        "docs/README.md",
        "LICENSE",
    ]:
        assert (bundle / f).is_file(), f
    assert verify_bundle(bundle) == []
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert [b.name for b in list_bundles(bundle.parent)] == ["blobs"]
    card = (bundle / "docs" / "README.md").read_text()
    assert "Research use only" in card and "| mean |" in card


def test_verify_reports_missing_metadata(bundle: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    meta = json.loads((broken / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))
    assert any("network_data_format" in p for p in verify_bundle(broken))


def test_bundle_and_checkpoint_give_the_same_mask(bundle: Path, tiny_model: Path, tmp_path: Path) -> None:
    img, _ = make_blob_case(tmp_path, "scan", seed=7)
    a = medunet.segment(img, medunet.load_model(bundle)).labels
    b = medunet.segment(img, medunet.load_model(tiny_model)).labels
    assert (a == b).float().mean() > 0.999  # float16 weights change almost nothing


def test_outside_bundle_is_not_run(bundle: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    cfg = json.loads((other / "configs" / "inference.json").read_text())
    cfg["network_def"]["_target_"] = "os.system"
    (other / "configs" / "inference.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="not a medunet bundle"):
        medunet.load_model(other)


def test_monai_tooling_accepts_the_bundle(bundle: Path, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    for i in range(2):
        img, _ = make_blob_case(tmp_path / "src", f"s{i}", seed=30 + i)
        scans.mkdir(exist_ok=True)
        img.rename(scans / f"s{i}.nii.gz")
    masks = tmp_path / "masks"
    monai_bundle(
        "run",
        "--config_file",
        "configs/inference.json",
        "--bundle_root",
        ".",
        "--dataset_dir",
        str(scans),
        "--output_dir",
        str(masks),
        cwd=bundle,
    )
    assert sorted(p.name for p in masks.iterdir()) == ["s0.nii.gz", "s1.nii.gz"]
    ours = medunet.segment(scans / "s0.nii.gz", medunet.load_model(bundle)).labels.numpy()
    np.testing.assert_array_equal(np.asarray(nib.load(masks / "s0.nii.gz").dataobj), ours)

    monai_bundle(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        cwd=bundle,
    )
    monai_bundle(
        "verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(schema_path()), cwd=bundle
    )

    ts = tmp_path / "model.ts"
    monai_bundle(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(ts),
        "--ckpt_file",
        "models/model.pt",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        cwd=bundle,
    )
    model = medunet.load_model(bundle)
    scripted = torch.jit.load(str(ts))
    x = load_image(scans / "s1.nii.gz", 3)
    x = (x - x.mean()) / x.std()
    with torch.no_grad():
        eager = model.network(x.as_tensor()[None]).argmax(1)
        exported = scripted(x.as_tensor()[None]).argmax(1)
    assert torch.equal(eager, exported)


def test_retraining_a_planned_recipe_decides_what_it_leaves_open(tiny_config: Path, tmp_path: Path) -> None:
    """`train.json` retrains a planned recipe as `medunet train` trains it: mirrored averaging and the
    filter, left open (null), are decided on the validation cases and written into the model."""
    from medunet.bundle.components import run_training
    from medunet.config import load_config, to_dict
    from medunet.io import load_checkpoint

    overrides = {"train.epochs": 1, "infer.tta": None, "infer.largest_component": None}
    cfg = load_config(tiny_config, {**overrides, "augment.flip_prob": 0.5, "augment.flip_axes": [0]})
    best = run_training(to_dict(cfg), str(tmp_path), str(tmp_path / "run"), device="cpu")
    infer = load_checkpoint(best)["infer"]
    assert isinstance(infer["tta"], bool) and isinstance(infer["largest_component"], bool)


def test_default_model_env(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medunet.inference.model import default_model_path

    monkeypatch.setenv("MEDUNET_DEFAULT_MODEL", str(bundle))
    assert default_model_path() == bundle
    img, _ = make_blob_case(tmp_path, "d", seed=9)
    model = medunet.load_model(default_model_path())
    out = write_segmentation(medunet.segment(img, model), model, tmp_path / "m.nii.gz")
    assert nib.load(out).shape == nib.load(img).shape
