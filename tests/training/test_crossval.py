"""Cross-validation by patient: every patient validated once, a summary, fold ensembles and their bundle."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medunet.bundle.verify import verify_bundle
from medunet.inference import load_model
from medunet.io import load_checkpoint

from ..conftest import make_blob_case


def medunet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medunet", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_folds_summary_ensemble_and_bundle(tiny_config: Path, tmp_path: Path) -> None:
    run = tmp_path / "cv"
    proc = medunet("train", "-c", str(tiny_config), "-o", str(run), "--folds", "3", "--epochs", "2", "--no-tracking")
    assert proc.returncode == 0, proc.stderr
    assert "mean" in proc.stdout and "std" in proc.stdout

    # every patient is validated exactly once, and never trained on by its own fold
    def patient(case_id: str) -> int:  # the blob manifest: cases c0..c7 of patients p0..p3
        return int(case_id.removeprefix("c").split("_")[0]) // 2

    validated: list[int] = []
    for k in range(3):
        split = json.loads((run / f"fold_{k}" / "split.json").read_text())
        patients = {patient(c) for c in split["val"]}
        assert not patients & {patient(c) for c in split["train"]}
        validated += sorted(patients)
    assert sorted(validated) == [0, 1, 2, 3]

    summary = json.loads((run / "cv_summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 1, 2]
    for f in summary["folds"]:
        history = json.loads((run / f"fold_{f['fold']}" / "history.json").read_text())
        assert f["dice_mean"] == max(h["dice_mean"] for h in history if "dice_mean" in h)
    means = [f["dice"]["one"] for f in summary["folds"]]
    assert abs(summary["mean"]["one"] - sum(means) / 3) < 1e-9
    rows = list(csv.reader((run / "cv_summary.csv").open()))
    assert rows[0] == ["fold", "dice_one", "dice_two", "dice_mean", "best_epoch"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2", "mean", "std"]

    # --resume keeps complete folds
    before = (run / "fold_1" / "best.pt").stat().st_mtime_ns
    again = medunet("train", "-c", str(tiny_config), "-o", str(run), "--folds", "3", "--epochs", "2", "--resume")
    assert again.returncode == 0, again.stderr
    assert (run / "fold_1" / "best.pt").stat().st_mtime_ns == before

    # the run folder loads as the ensemble: the mean of the folds' probabilities
    ensemble = load_model(run)
    assert ensemble.network_config.ensemble == 3
    x = torch.randn(1, 1, 16, 16, 16)
    folds = [load_model(run / f"fold_{k}" / "best.pt").network for k in range(3)]
    with torch.no_grad():
        expected = torch.stack([torch.softmax(f(x), 1) for f in folds]).mean(0)
        torch.testing.assert_close(torch.softmax(ensemble.network(x), 1), expected, atol=1e-5, rtol=1e-4)

    img, _ = make_blob_case(tmp_path, "scan", seed=11)
    seg = medunet("infer", str(img), "-o", str(tmp_path / "mask.nii.gz"), "--model", str(run), "-q")
    assert seg.returncode == 0, seg.stderr

    # one bundle holds every fold's weights and MONAI's tooling accepts it
    built = medunet("bundle", "build", "--run", str(run), "--name", "cv_bundle", "--root", str(tmp_path / "bundles"))
    assert built.returncode == 0, built.stderr
    bundle = tmp_path / "bundles" / "cv_bundle"
    assert verify_bundle(bundle) == []
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["network_def"]["ensemble"] == 3
    assert json.loads((bundle / "configs" / "train.json").read_text())["folds"] == 3
    weights = load_checkpoint(bundle / "models" / "model.pt")
    assert {k.split(".")[1] for k in weights} == {"0", "1", "2"}
    assert "| mean ± sd |" in (bundle / "docs" / "README.md").read_text()
    net_check = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_net_in_out",
            "network_def",
            "--meta_file",
            str(bundle / "configs" / "metadata.json"),
            "--config_file",
            str(bundle / "configs" / "inference.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert net_check.returncode == 0, net_check.stderr


def test_ensemble_of_deep_supervised_members_averages_main_outputs() -> None:
    import dataclasses

    from medunet.config import NetworkConfig
    from medunet.inference.model import ensemble_payload, model_from_payload
    from medunet.networks import create_network

    cfg = NetworkConfig(spatial_dims=3, out_channels=3, features=(8, 16, 32), deep_supervision=True)
    members = [create_network(cfg).eval() for _ in range(2)]
    payloads = [{"network": dataclasses.asdict(cfg), "preprocess": {}, "state_dict": m.state_dict()} for m in members]
    model = model_from_payload(ensemble_payload(payloads, ["a", "b"]), "cv")
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
        torch.testing.assert_close(torch.softmax(model.network(x), 1), expected, atol=1e-5, rtol=1e-4)
