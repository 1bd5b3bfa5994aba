"""The pipelined batch (read next, run current, write previous) writes what the sequential loop writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medunet.inference import expand_inputs, load_model, plan_jobs, run_jobs
from medunet.inference.batch import Extras, read_statistics

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_pipelined_and_sequential_batches_agree_and_a_bad_scan_stops_neither(data_dir: Path, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    for n in ("004", "006", "007", "017"):
        shutil.copy(data_dir / "msd_hippocampus" / "images" / f"hippocampus_{n}.nii.gz", scans)
    (scans / "hippocampus_005.nii.gz").write_bytes(b"not a scan")  # second in order: fails in the reader
    model = load_model(REPO / "bundles" / "hippocampus_mri_3d")
    results = {}
    for pipelined in (True, False):
        out = tmp_path / f"out_{pipelined}"
        jobs = plan_jobs(expand_inputs([str(scans)]), out, 3)
        errors: list[str] = []
        done: list[str] = []
        stats = tmp_path / f"stats_{pipelined}.csv"
        result = run_jobs(
            jobs, model, pipelined=pipelined, extras=Extras(stats=stats), on_error=errors.append,
            on_done=lambda job, done=done: done.append(job.name),
        )  # fmt: skip
        assert [name for name, _ in result.failed] == [str(scans / "hippocampus_005.nii.gz")]
        assert len(errors) == 1 and errors[0].startswith(f"{scans / 'hippocampus_005.nii.gz'}: cannot be read")
        assert sorted(done) == sorted(job.name for job in jobs)
        assert [p.name for p in result.written] == [f"hippocampus_{n}.nii.gz" for n in ("004", "006", "007", "017")]
        results[pipelined] = {p.name: np.asarray(nib.load(p).dataobj) for p in result.written}
        assert len(read_statistics(stats)) == 2 * 4
    assert all(np.array_equal(results[True][k], results[False][k]) for k in results[False])
