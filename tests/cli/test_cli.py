"""The command line as a user meets it: one line on stderr for bad input, nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import make_blob_case


def medunet(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medunet", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("medunet: error")]


@pytest.mark.slow
def test_infer_writes_mask_and_errors_are_one_line(tiny_model: Path, tmp_path: Path) -> None:
    img, _ = make_blob_case(tmp_path, "scan", seed=5)
    out = tmp_path / "out" / "mask.nii.gz"
    ok = medunet("infer", str(img), "-o", str(out), "--model", str(tiny_model), "-q")
    assert ok.returncode == 0, ok.stderr
    assert f"wrote {out}" in ok.stdout
    assert nib.load(out).shape == nib.load(img).shape

    missing = medunet(
        "infer", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "m2.nii.gz"), "--model", str(tiny_model), "-q"
    )
    assert missing.returncode == 1
    assert error_lines(missing) == [f"medunet: error: {tmp_path / 'nope.nii.gz'}: no such file or folder"]
    assert "Traceback" not in missing.stderr and not (tmp_path / "m2.nii.gz").exists()

    four_d = tmp_path / "dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(four_d))
    bad = medunet("infer", str(four_d), "-o", str(tmp_path / "m3.nii.gz"), "--model", str(tiny_model), "-q")
    assert bad.returncode == 1 and "dwi.nii.gz: expected a 3D image, got 4D" in bad.stderr
    assert not (tmp_path / "m3.nii.gz").exists()

    not_a_model = tmp_path / "model.pt"
    not_a_model.write_bytes(b"\x80\x04junk")
    bad_model = medunet("infer", str(img), "-o", str(tmp_path / "m4.nii.gz"), "--model", str(not_a_model))
    assert bad_model.returncode == 1 and "model.pt: not a loadable medunet checkpoint" in bad_model.stderr


def test_train_refuses_label_with_other_geometry(tmp_path: Path, tiny_config: Path) -> None:
    cases = tmp_path / "cases"
    _, lab = make_blob_case(cases, "c0", seed=0)
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), str(lab))
    manifest = tmp_path / "manifest.csv"
    text = manifest.read_text().splitlines()
    manifest.write_text("\n".join(text) + "\n")
    proc = medunet("train", "--config", str(tiny_config), "--output", str(tmp_path / "run"), "-q")
    assert proc.returncode == 1
    assert error_lines(proc) == [
        f"medunet: error: {lab}: label shape (10, 10, 10) does not match image shape (24, 28, 20)"
    ]
    assert not (tmp_path / "run" / "best.pt").exists()


@pytest.mark.slow
def test_train_then_evaluate(tmp_path: Path, tiny_config: Path) -> None:
    run = tmp_path / "run"
    proc = medunet("train", "--config", str(tiny_config), "--output", str(run), "--epochs", "2", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "best mean Dice" in proc.stdout and (run / "best.pt").exists()

    scans, labels = tmp_path / "scans", tmp_path / "labels"
    for i in range(2):
        img, lab = make_blob_case(tmp_path / "src", f"e{i}", seed=20 + i)
        scans.mkdir(exist_ok=True)
        labels.mkdir(exist_ok=True)
        img.rename(scans / f"e{i}.nii.gz")
        lab.rename(labels / f"e{i}.nii.gz")
    proc = medunet("infer", str(scans), "-o", str(tmp_path / "masks"), "--model", str(run / "best.pt"), "-q")
    assert proc.returncode == 0, proc.stderr
    report = tmp_path / "report.csv"
    proc = medunet("evaluate", "--pred", str(tmp_path / "masks"), "--label", str(labels), "-o", str(report))
    assert proc.returncode == 0, proc.stderr
    rows = report.read_text().splitlines()
    assert rows[0] == "case,label,dice,hd95_mm,pixel_error" and len(rows) >= 3
    assert (tmp_path / "report_summary.csv").exists()


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("network: {name: unet, featurs: [1]}\n")
    proc = medunet("train", "--config", str(cfg), "--output", str(tmp_path / "r"))
    assert proc.returncode == 1
    assert len(error_lines(proc)) == 1 and "unknown key(s) ['featurs']" in proc.stderr


def test_dicom_patient_tags_stay_out_of_outputs(tiny_model: Path, data_dir: Path, tmp_path: Path) -> None:
    import gzip

    import pydicom

    series = tmp_path / "series"
    series.mkdir()
    for f in sorted((data_dir / "totalseg_examples" / "example_ct_dicom").iterdir())[:4]:
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JANE", "MRN123456", "19700101"
        ds.save_as(series / f.name)
    out = tmp_path / "mask.nii.gz"
    proc = medunet("infer", str(series), "-o", str(out), "--model", str(tiny_model))
    assert proc.returncode == 0, proc.stderr
    written = gzip.decompress(out.read_bytes())
    for secret in ("DOE", "JANE", "MRN123456", "19700101"):
        assert secret not in proc.stdout and secret not in proc.stderr
        assert secret.encode() not in written
