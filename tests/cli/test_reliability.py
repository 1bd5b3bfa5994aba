"""What ``medunet infer`` guarantees a user: inputs never overwritten, damaged DICOM refused (or read
knowingly), every series choosable, one line per problem, no confident mask on a blank scan."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.cli.test_cli import medunet
from tests.conftest import DATA, REPO

MODEL = str(REPO / "bundles" / "hippocampus_mri_3d")
SCAN = REPO / "examples" / "hippocampus_017.nii.gz"
CT = ("totalseg_examples", "example_ct_dicom")


def digest(path: Path) -> str:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files if f.is_file())).hexdigest()


def stderr_lines(proc) -> list[str]:  # type: ignore[no-untyped-def]
    return [line for line in proc.stderr.splitlines() if line.strip()]


def ct_series(data_dir: Path, dest: Path, start: int = 6, stop: int = 14) -> Path:
    dest.mkdir(parents=True)
    for f in sorted(data_dir.joinpath(*CT).iterdir())[start:stop]:
        shutil.copy(f, dest / f.name)
    return dest


@pytest.mark.slow
def test_an_output_that_is_an_input_is_refused_before_anything_runs(tmp_path: Path, data_dir: Path) -> None:
    scan = tmp_path / "scan.nii.gz"
    shutil.copy(SCAN, scan)
    before = digest(scan)
    same = medunet("infer", str(scan), "-o", str(scan), "--model", MODEL)
    assert same.returncode == 1
    assert stderr_lines(same) == [
        f"medunet: error: {scan}: is an input of this run; writing there would destroy it (choose another path)"
    ]
    assert digest(scan) == before

    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(SCAN, folder / "a.nii.gz")
    into_itself = medunet("infer", str(folder), "-o", str(folder), "--model", MODEL)
    assert into_itself.returncode == 1 and "is an input of this run" in into_itself.stderr
    other = tmp_path / "uncompressed"
    other.mkdir()
    nib.save(nib.load(SCAN), other / "b.nii")  # its mask would be b.nii.gz: no input's name, but among the scans
    beside = medunet("infer", str(other), "-o", str(other), "--model", MODEL)
    assert beside.returncode == 1 and "would be written into an input folder" in beside.stderr
    assert sorted(p.name for p in other.iterdir()) == ["b.nii"]

    stats = medunet("infer", str(scan), "-o", str(tmp_path / "m.nii.gz"), "--model", MODEL, "--stats", str(scan))
    assert stats.returncode == 1 and "is an input of this run" in stats.stderr and digest(scan) == before

    series = ct_series(data_dir, tmp_path / "series", 6, 9)
    listing = sorted(p.name for p in series.iterdir())
    inside = medunet("infer", str(series), "-o", str(series / "mask.nii.gz"), "--model", MODEL)
    assert inside.returncode == 1 and "would be written into an input folder" in inside.stderr
    assert sorted(p.name for p in series.iterdir()) == listing and not (tmp_path / "m.nii.gz").exists()


@pytest.mark.slow
def test_damaged_dicom_series_is_refused_with_the_missing_position(tmp_path: Path, data_dir: Path) -> None:
    series = ct_series(data_dir, tmp_path / "series")
    victim = sorted(series.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:2000])
    before = digest(series)
    out = tmp_path / "mask.nii.gz"
    proc = medunet("infer", str(series), "-o", str(out), "--model", MODEL)
    assert proc.returncode == 1 and not out.exists()
    assert stderr_lines(proc) == [
        f"medunet: error: {series}: DICOM series 1: no SeriesInstanceUID (CT, 7 files): {victim.name} cannot be read "
        "(the file ends at 2000 bytes, before its pixel data); 1 slice missing at -784.5 mm along the normal "
        "(step 2 mm); refused (--accept-damaged-series reads the readable slices anyway)"
    ]

    accepted = medunet("infer", str(series), "-o", str(out), "--model", MODEL, "--accept-damaged-series", "-q")
    assert accepted.returncode == 0, accepted.stderr
    assert nib.load(out).shape == (512, 512, 7)
    warnings = stderr_lines(accepted)
    assert len(warnings) == 2 and warnings[0].startswith(f"medunet: warning: {series}: reading DICOM series 1 as asked")
    assert warnings[1].startswith(f"medunet: warning: {series}: unlike the training data: ")  # a CT, an MRI model
    assert "Non uniform sampling" not in accepted.stderr  # ITK's own words only with -v
    verbose = medunet("infer", str(series), "-o", str(out), "--model", MODEL, "--accept-damaged-series", "-q", "-v")
    assert verbose.returncode == 0 and "Non uniform sampling or missing slices detected" in verbose.stderr
    assert digest(series) == before


@pytest.mark.slow
def test_a_series_without_uid_is_chosen_by_its_number(tmp_path: Path, data_dir: Path) -> None:
    folder = ct_series(data_dir, tmp_path / "folder", 6, 10)  # the example series has no SeriesInstanceUID
    for tag in ("b", "c"):
        uid = pydicom.uid.generate_uid()
        for f in sorted(data_dir.joinpath(*CT).iterdir())[6:10]:
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, pydicom.uid.generate_uid()
            ds.save_as(folder / f"{tag}_{f.name}")
    proc = medunet("infer", str(folder), "-o", str(tmp_path / "m.nii.gz"), "--model", MODEL)
    assert proc.returncode == 1
    (line,) = stderr_lines(proc)
    assert "folder holds 3 DICOM series; pick one with --series NUMBER: 1: no SeriesInstanceUID (CT, 4 files); 2: " in (
        line
    )
    out = tmp_path / "first.nii.gz"
    chosen = medunet("infer", str(folder), "--series", "1", "-o", str(out), "--model", MODEL, "-q")
    assert chosen.returncode == 0, chosen.stderr
    assert nib.load(out).shape == (512, 512, 4)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.nii.gz", b"", "Empty file"),
        ("random.nii.gz", gzip.compress(np.random.default_rng(0).bytes(4000)), "ImageFileError"),
        ("text.nii.gz", b"patient list\n", "not a gzip file"),
        ("picture.nii.gz", DATA / "isbi2012_membrane" / "train" / "image" / "0.png", "not a gzip file"),
    ],
)
def test_an_unreadable_file_is_exactly_one_line(tmp_path: Path, name: str, content, reason: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / name
    if isinstance(content, Path) and not content.is_file():
        pytest.skip(f"shared data not found at {content}")
    path.write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    proc = medunet("infer", str(path), "-o", str(tmp_path / "m.nii.gz"), "--model", MODEL)
    assert proc.returncode == 1
    (line,) = stderr_lines(proc)
    assert line.startswith(f"medunet: error: {path}: cannot be read as an image (") and reason in line
    assert not (tmp_path / "m.nii.gz").exists()


def test_a_folder_without_dicom_and_a_code_running_checkpoint_are_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    proc = medunet("infer", str(folder), "-o", str(tmp_path / "m.nii.gz"), "--model", MODEL)
    assert proc.returncode == 1
    assert stderr_lines(proc) == [f"medunet: error: {folder}: folder holds no DICOM image series"]

    import os

    import torch

    class RunsCode:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.getcwd, ())

    evil = tmp_path / "model.pt"
    torch.save({"state_dict": RunsCode()}, evil)
    bad = medunet("infer", str(SCAN), "-o", str(tmp_path / "m.nii.gz"), "--model", str(evil))
    assert bad.returncode == 1
    assert stderr_lines(bad) == [
        f"medunet: error: {evil}: refused: it holds Python objects that would run code when loaded "
        "(posix.getcwd); medunet loads weights only"
    ]


def test_a_blank_scan_gets_a_warning_and_an_empty_mask(tmp_path: Path) -> None:
    ref = nib.load(SCAN)
    blank = tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(ref.shape, np.float32), ref.affine), str(blank))
    out, stats = tmp_path / "mask.nii.gz", tmp_path / "stats.csv"
    proc = medunet("infer", str(blank), "-o", str(out), "--model", MODEL, "--stats", str(stats), "-q")
    assert proc.returncode == 0, proc.stderr
    assert stderr_lines(proc) == [
        f"medunet: warning: {blank}: the scan holds no signal (every voxel is 0); its mask is left empty"
    ]
    assert not np.asarray(nib.load(out).dataobj).any()
    assert [line.split(",")[3] for line in stats.read_text().splitlines()[1:]] == ["0", "0"]
    assert [line.split(",")[5] for line in stats.read_text().splitlines()[1:]] == ["blank", "blank"]  # the guard's flag
