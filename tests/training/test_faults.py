"""Faults: SIGKILL at random moments, then --resume, ends where an uninterrupted run ends; an output
folder that cannot take the checkpoints is reported before any data is read."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from medunet.io import load_checkpoint

EPOCHS = "40"


def train_cmd(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medunet", "train", "-c", str(cfg), "-o", str(out), "--epochs", EPOCHS, *extra]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tiny_config: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    started = time.monotonic()
    proc = subprocess.Popen(train_cmd(tiny_config, reference, "--no-tracking", "-q"), stderr=subprocess.PIPE)
    while not (reference / "last.pt").exists() and proc.poll() is None:
        time.sleep(0.01)
    first_checkpoint = time.monotonic() - started  # start-up, caching and one epoch
    assert proc.wait(timeout=600) == 0, proc.stderr.read() if proc.stderr else ""
    duration = time.monotonic() - started

    run = tmp_path / "killed"
    rng = random.Random(int(os.environ.get("MEDUNET_KILL_SEED", "1234")))
    cmd = train_cmd(tiny_config, run, "--resume", "--no-tracking", "-q")
    kills, epochs_at_kill = 0, []
    for _ in range(4):  # kill four times at random moments (each run restarts from the last checkpoint)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # anywhere from start-up to mid-run: before any checkpoint, mid-epoch, mid-write
            latest = first_checkpoint + 0.5 * (duration - first_checkpoint)  # a later run starts warm and is faster
            proc.wait(timeout=rng.uniform(0.5 * first_checkpoint, latest))
            assert proc.returncode == 0
            break  # finished before its kill
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            if (run / "last.pt").exists():  # whatever is there is a whole checkpoint, never a torn one
                epochs_at_kill.append(load_checkpoint(run / "last.pt")["epoch"])
    else:  # then let it finish
        finish = subprocess.run(cmd, capture_output=True, timeout=600)
        assert finish.returncode == 0, finish.stderr
    print(f"{kills} kills; last.pt held epoch {epochs_at_kill} at the kills")
    assert kills >= 1, "the run finished before it could be killed"
    assert epochs_at_kill == sorted(epochs_at_kill)  # every resume moved forward

    final, expected = load_checkpoint(run / "last.pt"), load_checkpoint(reference / "last.pt")
    assert [h["epoch"] for h in final["history"]] == list(range(1, int(EPOCHS) + 1))
    for key, value in expected["state_dict"].items():  # exact resume: the same weights as never killed
        torch.testing.assert_close(final["state_dict"][key], value, rtol=0, atol=0)
    assert {k for k in final["rng"]} >= {"python", "numpy", "torch"}
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("medunet: error")]


def test_output_under_a_file_is_refused_before_training(tiny_config: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    proc = subprocess.run(
        train_cmd(tiny_config, blocker / "run", "--no-tracking"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1
    lines = error_lines(proc)
    assert len(lines) == 1 and str(blocker / "run") in lines[0] and "not writable" in lines[0]


def test_a_bad_label_file_is_one_line_and_exit_1_while_other_cases_still_load(data_dir: Path, tmp_path: Path) -> None:
    """The error leaves the cache while other loader threads are inside torch: they are waited for,
    not left running into the interpreter's exit (which aborts the process)."""
    cases = sorted((data_dir / "brats2015_deepmedic").glob("*/brats_*"))[:4]
    rows = ["case_id,image,label,patient_id"]
    rows += [f"{c.name},{c / 'Flair_subtrMeanDivStd.nii.gz'},{c / 'OTMultiClass.nii.gz'},{c.name}" for c in cases]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "data: {manifest: m.csv, val_fraction: 0.5}\n"
        "preprocess: {label_names: [background, tumour], label_map: [[1, 1], [2, 1], [3, 1], [4, 1]],"
        " patch_size: [32, 32, 32]}\n"
        "network: {features: [8, 16]}\n"
    )
    proc = subprocess.run(train_cmd(cfg, tmp_path / "run", "--no-tracking"), capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc)
    assert (
        len(lines) == 1 and "OTMultiClass.nii.gz: label values [0, 1, 2, 3, 4] are not all in label_map" in lines[0]
    ), proc.stderr
    assert "terminate called" not in proc.stderr


@pytest.fixture
def tiny_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A full 1 MiB disk and a read-only one (tmpfs; needs root and mount, else skipped)."""
    full, readonly = tmp_path / "full", tmp_path / "readonly"
    full.mkdir()
    readonly.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mounted = []
    for path, options in ((full, "size=1m"), (readonly, "ro,size=1m")):
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
            for m in mounted:
                subprocess.run(["umount", str(m)])
            pytest.skip("cannot mount tmpfs here")
        mounted.append(path)
    try:
        yield full, readonly
    finally:
        for m in mounted:
            subprocess.run(["umount", str(m)])


@pytest.mark.slow
def test_full_or_read_only_disk_is_refused_before_training(tiny_config: Path, tiny_mount: tuple[Path, Path]) -> None:
    full, readonly = tiny_mount
    proc = subprocess.run(train_cmd(tiny_config, full / "run", "--no-tracking"), capture_output=True, text=True)
    assert proc.returncode == 1
    lines = error_lines(proc)
    assert len(lines) == 1 and str(full / "run") in lines[0] and "MiB free on this disk" in lines[0], proc.stderr
    assert "training and" not in proc.stderr  # refused before the data was read

    proc = subprocess.run(train_cmd(tiny_config, readonly / "run", "--no-tracking"), capture_output=True, text=True)
    assert proc.returncode == 1
    lines = error_lines(proc)
    assert len(lines) == 1 and "not writable" in lines[0] and "Read-only file system" in lines[0], proc.stderr
