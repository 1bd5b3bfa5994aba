"""Sharding a batch over processes (torchrun) and scheduler arrays (--shard K/N), on real scans."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medunet.inference.batch import STATS_COLUMNS
from medunet.inference.shards import Shard, launcher_shard, merge_parts, parse_shard, part_path

MEDUNET = [sys.executable, "-m", "medunet"]
SCANS = ("004", "006", "007", "017", "033")


@pytest.fixture()
def scans(data_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "scans"
    folder.mkdir()
    for n in SCANS:
        shutil.copy(data_dir / "msd_hippocampus" / "images" / f"hippocampus_{n}.nii.gz", folder)
    return folder


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def test_shards_split_the_list_once_and_deterministically() -> None:
    items = list(range(11))
    parts = [Shard(k, 3).select(items) for k in range(3)]
    assert sorted(x for p in parts for x in p) == items
    assert parts[0] == [0, 3, 6, 9] and parts == [Shard(k, 3).select(items) for k in range(3)]
    assert parse_shard("2/4") == Shard(2, 4) and str(Shard(2, 4)) == "2/4"
    for bad in ("4/4", "1/0", "-1/2", "a/b", "3"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    assert launcher_shard({"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2)
    assert launcher_shard({"RANK": "0", "WORLD_SIZE": "1"}) is None and launcher_shard({}) is None


def _write_part(stats: Path, k: int, n: int, scans: list[str]) -> None:
    part = part_path(stats, Shard(k, n))
    part.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=STATS_COLUMNS)
        writer.writeheader()
        for s in scans:
            for label in (1, 2):
                writer.writerow({"scan": s, "label": label, "name": f"l{label}", "voxels": 1, "volume_ml": 0.001})
    merge_parts(stats, n, STATS_COLUMNS)


@pytest.mark.slow
def test_shards_merging_at_once_lose_no_row(tmp_path: Path) -> None:
    stats = tmp_path / "stats.csv"
    context = get_context("spawn")
    jobs = [context.Process(target=_write_part, args=(stats, k, 4, [f"s{k}_{i}" for i in range(30)])) for k in range(4)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
        assert job.exitcode == 0
    merged = rows(stats)
    assert len(merged) == 4 * 30 * 2 and len({(r["scan"], r["label"]) for r in merged}) == len(merged)


@pytest.mark.slow
def test_two_torchrun_processes_write_what_one_process_writes(scans: Path, tmp_path: Path) -> None:
    # on 2 cores each torchrun process runs one thread; the single process does too, since OpenVINO's
    # bfloat16 sums come out a few voxels apart with another number of threads
    one = subprocess.run(
        [*MEDUNET, "infer", str(scans), "-o", str(tmp_path / "one"), "--stats", str(tmp_path / "one.csv"), "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // 2))},
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "medunet", "infer", str(scans),
         "-o", str(tmp_path / "two"), "--stats", str(tmp_path / "two.csv"), "-q"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert "(2 of 2 shards so far)" in two.stdout
    a, b = masks(tmp_path / "one"), masks(tmp_path / "two")
    assert list(a) == [f"hippocampus_{n}.nii.gz" for n in SCANS] and list(b) == list(a)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert rows(tmp_path / "one.csv") == rows(tmp_path / "two.csv")


@pytest.mark.slow
def test_a_killed_shard_rerun_with_resume_completes_the_statistics(scans: Path, tmp_path: Path) -> None:
    # more scans than the other tests use, so that the shard killed after its first mask still has
    # several to go (with two, the second was at times written before the kill landed)
    extra = [f"{n}{k}" for k in range(2) for n in SCANS]
    for name in extra:
        shutil.copy(scans / f"hippocampus_{name[:3]}.nii.gz", scans / f"hippocampus_{name}.nii.gz")
    names = sorted([*SCANS, *extra])
    out, stats = tmp_path / "masks", tmp_path / "stats.csv"
    base = [*MEDUNET, "infer", str(scans), "-o", str(out), "--stats", str(stats), "-q"]
    first = subprocess.run([*base, "--shard", "0/2"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "(1 of 2 shards so far)" in first.stdout
    mine = {f"hippocampus_{n}.nii.gz" for n in names[1::2]}  # shard 1/2: every other scan from the 2nd
    proc = subprocess.Popen([*base, "--shard", "1/2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (mine & {p.name for p in out.glob("*.nii.gz")}) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # no handler runs: its statistics part is never written
    proc.wait()
    assert mine - {p.name for p in out.glob("*.nii.gz")}, "the shard finished before it was killed"
    rerun = subprocess.run([*base, "--shard", "1/2", "--resume"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "(2 of 2 shards so far)" in rerun.stdout
    merged = rows(stats)
    assert sorted({r["scan"] for r in merged}) == [f"hippocampus_{n}" for n in names]
    assert len(merged) == 2 * len(names)  # two labels per scan, none lost, none repeated
    again = subprocess.run([*base, "--shard", "0/2", "--resume"], capture_output=True, text=True)
    assert again.returncode == 0 and rows(stats) == merged
