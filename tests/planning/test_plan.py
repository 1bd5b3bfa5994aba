"""The plan end to end on real cardiac scans: check, fingerprint, config, manifest, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medunet.config import load_config
from medunet.data.layouts import read_dataset
from medunet.planning import DatasetError, PlanRequest, fingerprint_dataset, plan_dataset
from medunet.planning import fingerprint as fingerprint_module

PATIENTS = ("patient001", "patient002", "patient003")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDUNET_CACHE", str(tmp_path / "cache"))


def small_acdc(data_dir: Path, root: Path) -> Path:
    """Three ACDC patients (six frames) in the nnU-Net layout, the files linked, not copied."""
    src = data_dir / "acdc_cardiac"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for f in sorted((src / "imagesTr").iterdir()):
        if f.name.startswith(PATIENTS):
            (root / "imagesTr" / f.name).symlink_to(f)
            label = f.name.replace("_0000", "")
            (root / "labelsTr" / label).symlink_to(src / "labelsTr" / label)
    shutil.copy(src / "dataset.json", root / "dataset.json")
    return root


def test_fingerprint_of_real_cardiac_scans(data_dir: Path, tmp_path: Path) -> None:
    ds = read_dataset(small_acdc(data_dir, tmp_path / "acdc"))
    fp = fingerprint_dataset(ds, workers=2, progress=False)
    assert len(fp["cases"]) == 6 and fp["modalities"] == ["cineMRI"]
    case = fp["cases"][0]
    assert case["spacing"] == pytest.approx([1.5625, 1.5625, 10.0])
    assert case["orientation"] == "RAS" and len(case["shape"]) == 3
    assert all(hi > lo for lo, hi in case["foreground_box"])
    assert set(case["label_counts"]) == {"0", "1", "2", "3"}
    pct = fp["channels"][0]["foreground_percentiles"]
    assert pct["0.5"] < pct["50.0"] < pct["99.5"]
    assert fp["label_voxels"]["LV"] > 0


def test_second_fingerprint_reads_the_cache(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = read_dataset(small_acdc(data_dir, tmp_path / "acdc"))
    first = fingerprint_dataset(ds, workers=1, progress=False)

    def no_reading(job):  # type: ignore[no-untyped-def]
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(fingerprint_module, "case_fingerprint", no_reading)
    assert fingerprint_dataset(ds, workers=1, progress=False) == first


def test_plan_writes_a_config_that_loads_with_its_manifest_and_fingerprint(data_dir: Path, tmp_path: Path) -> None:
    root = small_acdc(data_dir, tmp_path / "acdc")
    out = tmp_path / "plans" / "acdc.yaml"
    plan = plan_dataset(PlanRequest(root, out, time_budget_minutes=5, workers=1, progress=False))
    cfg = load_config(out)
    assert cfg == plan.config.__class__(**{**plan.config.__dict__, "data": cfg.data})
    assert cfg.network.spatial_dims == 2  # 9 slices of 10 mm
    assert cfg.preprocess.label_names == ("background", "RV", "MYO", "LV")
    assert cfg.data.fingerprint is not None and cfg.data.fingerprint.is_file()
    text = out.read_text()
    assert "# " in text and "median spacing" in text and "augment:" in text
    rows = cfg.data.manifest.read_text().splitlines()
    assert rows[0] == "case_id,image,label,patient_id,slice"
    depth = sum(int(nib.load(str(p)).shape[-1]) for p in sorted((root / "imagesTr").iterdir()))
    assert len(rows) - 1 == depth  # one row per slice
    assert {r.split(",")[3] for r in rows[1:]} == set(PATIENTS)
    assert cfg.network.deep_supervision and "network.deep_supervision" in plan.reasons
    assert "train.precision" in plan.reasons and "precision:" in text
    # mirrored along the in-plane axis that keeps the labels' meaning, so averaging is left to the validation
    assert cfg.augment.flip_axes and cfg.infer.tta is None and "tta: null" in text
    assert "raises their mean Dice" in plan.reasons["infer.tta"]


def test_bf16_only_where_the_cpu_has_it_and_a_step_measures_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from medunet.config import Precision
    from medunet.planning import plan as plan_module

    rates = {False: 1e10, True: 1.8e10}
    monkeypatch.setattr(plan_module, "_throughputs", lambda dims, bf16, norm, usage=None: {b: rates[b] for b in bf16})
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    speed = plan_module._precision_for("cpu", 2)
    assert (speed.precision, speed.train, speed.fp32) == (Precision.BF16, 1.8e10, 1e10)  # validation: float32
    assert "1.8x as fast" in speed.reason
    rates[True] = 1.1e10  # not worth it
    speed = plan_module._precision_for("cpu", 3)
    assert (speed.precision, speed.train) == (Precision.FP32, 1e10) and "too little" in speed.reason
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert plan_module._precision_for("cpu", 2).precision == Precision.FP32
    assert plan_module._precision_for("cuda", 3).precision == Precision.AUTO


def test_augmentation_counts_in_the_cpu_step_estimate(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training computes on every core, so the loader's crop and augmentation lengthen a CPU step: a
    costlier augmentation plans a smaller patch, and the reason says the estimate includes it."""
    import math

    from medunet.config import Norm, Precision
    from medunet.planning import plan as plan_module

    ds = read_dataset(small_acdc(data_dir, tmp_path / "acdc"))
    fp = fingerprint_dataset(ds, workers=2, progress=False)
    norms: list[Norm] = []

    def speed(kind: str, dims: int, norm: Norm, usage: plan_module.CpuUsage | None = None) -> plan_module.StepSpeed:
        norms.append(norm)
        return plan_module.StepSpeed(Precision.FP32, 1.3e11, 1.3e11, "fixed for the test")

    monkeypatch.setattr(plan_module, "_precision_for", speed)
    monkeypatch.setattr(plan_module, "_measure_step", lambda *args, **kw: 0.1)

    def planned(per_sample_at_128: float) -> tuple[int, ...]:
        cost = lambda patch: per_sample_at_128 * math.prod(patch) / 128**2  # noqa: E731
        monkeypatch.setattr(plan_module, "_augment_seconds", lambda *args: cost)
        plan = plan_module.make_plan(ds, fp, 30, "cpu")
        assert "augmentation included" in plan.reasons["preprocess.patch_size"]
        return plan.config.preprocess.patch_size

    free = planned(0.0)
    assert math.prod(planned(0.02)) < math.prod(free)
    assert norms == [Norm.BATCH, Norm.BATCH]  # the rate is measured with the 2D plan's batch norm


@pytest.mark.usefixtures("one_thread")
def test_a_plan_timed_on_a_busy_cpu_says_so(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps timed while other processes held the cores make a plan for a shared machine: the plan's
    notes say so; steps that got their threads' CPU time leave no such note."""
    import time

    from medunet.config import Precision
    from medunet.planning import plan as plan_module

    ds = read_dataset(small_acdc(data_dir, tmp_path / "acdc"))
    fp = fingerprint_dataset(ds, workers=2, progress=False)
    fixed = plan_module.StepSpeed(Precision.FP32, 1.3e11, 1.3e11, "fixed for the test")
    monkeypatch.setattr(plan_module, "_precision_for", lambda *args, **kw: fixed)
    monkeypatch.setattr(plan_module, "_augment_seconds", lambda *args: lambda patch: 0.0)
    # between a waiting step (no CPU time) and a computing one, also where this test shares the machine
    monkeypatch.setattr(plan_module, "BUSY_CPU_SHARE", 0.3)

    def measured_with(step: object) -> list[str]:
        def measure(*args: object, usage: plan_module.CpuUsage, **kw: object) -> float:
            return plan_module._typical_steps([step], steps=2, warmup=0, usage=usage)[0]  # type: ignore[list-item]

        monkeypatch.setattr(plan_module, "_measure_step", measure)
        return [n for n in plan_module.make_plan(ds, fp, 30, "cpu").notes if "CPU was busy" in n]

    def waiting() -> float:  # a step whose threads wait for the cores: wall time without CPU time
        time.sleep(0.05)
        return 0.05

    def computing() -> float:  # a step that keeps every thread busy
        t = time.perf_counter()
        torch_threads_busy(0.05)
        return time.perf_counter() - t

    assert measured_with(waiting) and not measured_with(computing)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread, so that a step's CPU share does not depend on how a library spreads small
    products over many cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def torch_threads_busy(seconds: float) -> None:
    """Keep torch's threads computing for about ``seconds``."""
    import time

    import torch

    a = torch.randn(256, 256)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a


def test_cpus_are_the_cores_at_most_a_containers_quota(tmp_path: Path) -> None:
    import os

    from medunet.runtime import available_cpus

    cores = float(len(os.sched_getaffinity(0)))
    assert available_cpus(tmp_path / "none") == cores  # no cgroup files: the cores
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")
    assert available_cpus(v2) == cores
    (v2 / "cpu.max").write_text("50000 100000\n")  # docker --cpus 0.5
    assert available_cpus(v2) == 0.5
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(v1.parent) == cores
    (v1 / "cpu.cfs_quota_us").write_text("25000\n")
    assert available_cpus(v1.parent) == 0.25


@pytest.mark.usefixtures("one_thread")
def test_cpu_usage_is_the_share_of_the_threads_cpu_time_a_timed_step_got() -> None:
    import time

    from medunet.planning import plan as plan_module

    idle, busy = plan_module.CpuUsage(), plan_module.CpuUsage()
    assert idle.share == 1.0  # nothing timed: nothing to warn about
    assert idle.timed(lambda: time.sleep(0.1) or 0.1) == 0.1
    busy.timed(lambda: torch_threads_busy(0.3) or 0.3)
    # a computing thread gets most of a core even on a machine this test shares (0.55 beside a training run)
    assert idle.share < 0.2 and busy.share > 0.4 and busy.threads == 1


def test_cpu_usage_counts_what_a_containers_quota_lets_the_threads_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads beyond a quota's CPUs cannot get their time: they do not make an idle container busy."""
    import torch

    from medunet.planning import plan as plan_module

    monkeypatch.setattr(plan_module, "available_cpus", lambda: 0.5)
    usage = plan_module.CpuUsage()
    usage.timed(lambda: torch_threads_busy(0.2) or 0.2)
    assert usage.threads == torch.get_num_threads() and usage.capacity < 0.5 * 0.2 * 1.5


def test_augmentation_is_timed_in_2d_and_3d_also_on_images_smaller_than_the_crops() -> None:
    from medunet.config import AugmentConfig
    from medunet.planning import plan as plan_module

    for dims, shape in ((2, (96.4, 80.0)), (2, (12.0, 20.0)), (3, (20.0, 30.0, 6.0))):
        aug = AugmentConfig(flip_axes=tuple(range(dims)), elastic_prob=0.5)
        per_sample = plan_module._augment_seconds(aug, dims, shape, 4, draws=4)
        for patch in ((8,) * dims, (16,) * dims, (64,) * dims):
            assert 0 < per_sample(patch) < 1.0


def test_step_time_is_measured_with_deep_supervision_and_bf16() -> None:
    from medunet.config import NetworkConfig
    from medunet.planning import plan as plan_module

    net = NetworkConfig(spatial_dims=2, out_channels=3, features=(8, 16, 32), deep_supervision=True)
    for bf16 in (False, True):
        assert plan_module._measure_step(net, (32, 32), 2, bf16, steps=1, warmup=0) > 0


def test_step_timers_take_turns_and_the_median_step_counts() -> None:
    from medunet.planning import plan as plan_module

    calls: list[str] = []
    loads = iter([9.0, 9.0, 5.0, 2.0, 1.0, 4.0, 3.0, 0.5])  # a load that comes and goes

    def timer(name: str):  # type: ignore[no-untyped-def]
        def step() -> float:
            calls.append(name)
            return next(loads)

        return step

    assert plan_module._typical_steps([timer("a"), timer("b")], steps=3, warmup=1) == [3.0, 2.0]
    assert calls == ["a", "b"] * 4


def _broken(data_dir: Path, root: Path) -> Path:
    small_acdc(data_dir, root)
    images, labels = root / "imagesTr", root / "labelsTr"
    # a truncated image
    victim = images / "patient001_frame01_0000.nii.gz"
    data = victim.read_bytes()
    victim.unlink()
    victim.write_bytes(data[:2000])
    # a label on another grid
    lab = labels / "patient002_frame01.nii.gz"
    arr = np.asarray(nib.load(str(lab)).dataobj)
    lab.unlink()
    nib.save(nib.Nifti1Image(arr[:-4], np.diag([1.5625, 1.5625, 10.0, 1.0])), str(lab))
    # a label value dataset.json does not declare
    lab = labels / "patient003_frame01.nii.gz"
    img = nib.load(str(lab))
    arr = np.asarray(img.dataobj).copy()
    arr[0, 0, 0] = 7
    lab.unlink()
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), str(lab))
    # a case without its label
    missing = sorted(labels.glob("patient002_frame*"))[-1]
    missing.unlink()
    # a channel dataset.json does not declare, and a label without its image
    (images / "patient003_frame01_0001.nii.gz").symlink_to(images / "patient003_frame01_0000.nii.gz")
    (labels / "patient099_frame01.nii.gz").symlink_to(labels / "patient003_frame01.nii.gz")
    return root


@pytest.mark.slow
def test_dataset_check_lists_every_problem_and_writes_nothing(data_dir: Path, tmp_path: Path) -> None:
    root = _broken(data_dir, tmp_path / "broken")
    out = tmp_path / "plans" / "broken.yaml"
    with pytest.raises(DatasetError) as info:
        plan_dataset(PlanRequest(root, out, workers=2, progress=False))
    problems = info.value.problems
    assert len(problems) == 6, problems
    text = "\n".join(problems)
    assert "patient003_frame01_0001.nii.gz: channel 1 is not in dataset.json's channel_names" in text
    assert "patient099_frame01.nii.gz: label without an image" in text
    assert "patient001_frame01_0000.nii.gz: cannot be read" in text
    assert "patient002_frame01.nii.gz: label shape" in text
    assert "label value(s) [7] not declared" in text
    assert "label missing for case patient002_frame" in text
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.slow
def test_plan_command_prints_the_reasons_and_refuses_a_broken_dataset(data_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MEDUNET_CACHE": str(tmp_path / "cache")}
    root = small_acdc(data_dir, tmp_path / "acdc")
    out = tmp_path / "plan.yaml"
    ok = subprocess.run(
        ["medunet", "plan", str(root), "-o", str(out), "--time-budget", "10m", "--workers", "1", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert ok.returncode == 0, ok.stderr
    assert "network.spatial_dims = 2" in ok.stdout and "preprocess.patch_size" in ok.stdout
    assert out.is_file()
    broken = _broken(data_dir, tmp_path / "broken")
    bad_out = tmp_path / "bad" / "plan.yaml"
    res = subprocess.run(
        ["medunet", "plan", str(broken), "-o", str(bad_out), "--workers", "1", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("medunet: error:") and "6 problem(s)" in lines[0]
    assert len(lines) == 7 and "Traceback" not in res.stderr
    assert not bad_out.parent.exists()


def _generated_dataset(gen: Path, root: Path, layout: str) -> Path:
    """Six generated cases as ``images/`` + ``labels/`` folders, or as a Decathlon dataset whose 4D
    images hold two channels; returns the image of the first case."""
    from tests.conftest import make_blob_case

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    training = []
    for i in range(6):
        img, lab = make_blob_case(gen, f"case{i}", seed=i)
        if layout == "msd":
            nii = nib.load(str(img))
            data = np.asarray(nii.dataobj, dtype=np.float32)
            name = f"case{i}.nii.gz"
            nib.save(nib.Nifti1Image(np.stack([data, -data], axis=-1), nii.affine), str(root / "images" / name))
            training.append({"image": f"./images/{name}", "label": f"./labels/{name}"})
        else:
            img.rename(root / "images" / f"case{i}.nii.gz")
        lab.rename(root / "labels" / f"case{i}.nii.gz")
    if layout == "msd":
        meta = {"modality": {"0": "T1", "1": "T2"}, "labels": {"0": "background", "1": "a", "2": "b"},
                "training": training}  # fmt: skip
        (root / "dataset.json").write_text(json.dumps(meta))
    return root / "images" / "case0.nii.gz"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["folders", "msd"])
def test_train_dataset_plans_trains_and_keeps_the_fingerprint(tmp_path: Path, layout: str) -> None:
    """`medunet train --dataset` on generated scans (a folder pair, or the Decathlon layout with 4D
    two-channel images): the plan, a model that carries the fingerprint, and a mask on the scan's grid."""
    from medunet.io import load_checkpoint

    root = tmp_path / "ds"
    first = _generated_dataset(tmp_path / "gen", root, layout)
    env = {**os.environ, "MEDUNET_CACHE": str(tmp_path / "cache")}
    run = tmp_path / "run"
    res = subprocess.run(
        ["medunet", "train", "--dataset", str(root), "--output", str(run), "--time-budget", "20s",
         "--no-tracking", "-q"],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (run / "plan.yaml").is_file() and "best mean Dice" in res.stdout
    payload = load_checkpoint(run / "best.pt")
    fp = json.loads(payload["fingerprint"])
    labels = {"background": 0, "a": 1, "b": 2} if layout == "msd" else {"background": 0, "label1": 1, "label2": 2}
    assert len(fp["cases"]) == 6 and fp["labels"] == labels
    assert len(fp["channels"]) == (2 if layout == "msd" else 1)
    mask = tmp_path / "mask.nii.gz"
    res = subprocess.run(
        ["medunet", "infer", str(first), "-o", str(mask), "--model", str(run / "best.pt"), "-q"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert nib.load(str(mask)).shape == nib.load(str(first)).shape[:3]
