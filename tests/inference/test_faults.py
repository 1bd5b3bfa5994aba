"""Faults during a batch: a write the disk refuses, SIGINT/SIGTERM midway, an output folder that
cannot be written. No partial file is left, the other scans go on, and ``--resume`` finishes the rest."""

from __future__ import annotations

import csv
import errno
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medunet.inference import load_model
from medunet.inference.batch import Extras, Job, run_jobs
from tests.conftest import REPO

MODEL = REPO / "bundles" / "hippocampus_mri_3d"
CT = ("totalseg_examples", "example_ct_dicom")


def hippocampus_scans(data_dir: Path, folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    scans = sorted((data_dir / "msd_hippocampus" / "images").iterdir())[:count]
    for scan in scans:
        shutil.copy(scan, folder / scan.name)
    return sorted(folder.iterdir())


def stats_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def stray_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


@pytest.mark.slow
def test_a_write_the_disk_refuses_leaves_no_file_and_the_batch_goes_on(data_dir: Path, tmp_path: Path) -> None:
    """A real refusal by the OS: the command runs with a file-size limit (RLIMIT_FSIZE) that one mask
    exceeds, so its write fails midway (EFBIG, as a full disk fails with ENOSPC)."""
    scans = tmp_path / "scans"
    hippocampus_scans(data_dir, scans, 2)
    big = scans / "big.nii.gz"  # 96^3 of noise: its mask's file is far larger than the others'
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(96, 96, 96)).astype(np.float32), np.eye(4)), big)
    out, stats = tmp_path / "out", tmp_path / "stats.csv"
    limit = 8_000  # bytes: each hippocampus mask is under 2 KB; the noise volume's mask is about 19 KB

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-m", "medunet", "infer", str(scans), "-o", str(out), "--model", str(MODEL), "-q",
         "--stats", str(stats)],
        capture_output=True, text=True, timeout=600, preexec_fn=limit_files,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("medunet: error")]
    assert errors == [
        f"medunet: error: {big}: cannot write {out / 'big.nii.gz'}: File too large",
        "medunet: error: 1 of 3 scans failed",
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in scans.iterdir() if p != big)
    assert not stray_files(out)
    assert {r["scan"] for r in stats_rows(stats)} == {p.name.removesuffix(".nii.gz") for p in out.iterdir()}


@pytest.mark.slow
def test_a_refused_seg_or_statistics_write_leaves_no_file(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC from the DICOM SEG writer and the statistics writer, half a file in: each is one line."""
    import highdicom as hd

    series = tmp_path / "series"
    series.mkdir()
    for f in sorted(data_dir.joinpath(*CT).iterdir())[8:14]:
        shutil.copy(f, series / f.name)
    model = load_model(MODEL, device="cpu")

    def full_disk(self, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        Path(path).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", full_disk)
    out = tmp_path / "out" / "ct.nii.gz"
    messages: list[str] = []
    result = run_jobs([Job((series,), out)], model, extras=Extras(dicom_seg=True), on_error=messages.append)
    assert messages == [f"{series}: cannot write {out.parent / 'ct.seg.dcm'}: No space left on device"]
    assert result.failed and not result.written
    assert sorted(p.name for p in out.parent.iterdir()) == []  # no SEG, no temporary, and no mask without its SEG
    monkeypatch.undo()

    def writerows_full(self, rows):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", writerows_full)
    stats = tmp_path / "stats" / "volumes.csv"
    messages.clear()
    scan = REPO / "examples" / "hippocampus_017.nii.gz"
    result = run_jobs(
        [Job((scan,), tmp_path / "m" / "h.nii.gz")], model, extras=Extras(stats=stats), on_error=messages.append
    )
    assert result.written == [tmp_path / "m" / "h.nii.gz"]
    assert messages == [f"{stats}: cannot write the statistics (No space left on device)"]
    assert list(stats.parent.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_a_stopped_batch_leaves_whole_scans_and_resume_finishes_it(data_dir: Path, tmp_path: Path, signum: int) -> None:
    scans = tmp_path / "scans"
    hippocampus_scans(data_dir, scans, 8)
    out, stats = tmp_path / "out", tmp_path / "stats.csv"
    command = [sys.executable, "-m", "medunet", "infer", str(scans), "-o", str(out), "--model", str(MODEL), "-q",
               "--stats", str(stats)]  # fmt: skip
    # a shell running this in the background may have set SIGINT to be ignored, and Python then keeps it so
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (
        out.is_dir() and any(p.suffix == ".gz" and not p.name.startswith(".") for p in out.iterdir())
    ):
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (143 if signum == signal.SIGTERM else 130), err
    assert err.strip().splitlines()[-1] == "medunet: interrupted", err
    assert "Traceback" not in err
    written = sorted(p.name for p in out.iterdir())
    assert 1 <= len(written) < 8 and not stray_files(out)
    for name in written:  # every mask there is whole
        assert nib.load(out / name).get_fdata().shape == nib.load(scans / name).shape
    assert sorted(f"{r['scan']}.nii.gz" for r in stats_rows(stats)[::2]) == written

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {len(written)} scan(s) whose mask exists" in resumed.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in scans.iterdir())
    rows = stats_rows(stats)
    assert sorted(f"{r['scan']}.nii.gz" for r in rows[::2]) == sorted(p.name for p in scans.iterdir())
    assert len(rows) == 2 * 8
    stats.unlink()  # as after a run killed before it could write its CSV: counted from the masks
    again = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and stats_rows(stats) == rows


def test_an_unwritable_output_folder_is_found_before_any_scan_is_read(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    unreadable = tmp_path / "broken.nii.gz"
    unreadable.write_bytes(b"not an image")
    proc = subprocess.run(
        [sys.executable, "-m", "medunet", "infer", str(unreadable), str(REPO / "examples" / "hippocampus_017.nii.gz"),
         "-o", str(blocker / "masks"), "--model", str(MODEL)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("medunet:")]
    assert errors == [f"medunet: error: {blocker / 'masks'}: output folder cannot be written (Not a directory)"]
