"""What ``medunet infer`` writes beside the mask: statistics, QC pictures, DICOM SEG; and its options."""

from __future__ import annotations

import csv
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

import medunet
from medunet.inference.predictor import InferOptions, keep_largest_components
from medunet.io import load_checkpoint, save_checkpoint
from medunet.io.dicom_seg import write_dicom_seg
from tests.cli.test_cli import error_lines
from tests.cli.test_cli import medunet as run_medunet
from tests.conftest import REPO, make_blob_case

CT = ("totalseg_examples", "example_ct_dicom")


def test_folder_with_stats_qc_and_a_bad_file(tiny_model: Path, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    make_blob_case(scans, "iso", seed=1)
    make_blob_case(scans, "aniso", seed=2, affine=np.diag([0.5, 0.5, 3.0, 1.0]))
    for p in scans.glob("*_lab.nii.gz"):
        p.unlink()
    (scans / "broken.nii.gz").write_bytes(b"not a scan")
    masks, stats, qc = tmp_path / "masks", tmp_path / "stats.csv", tmp_path / "qc"
    proc = run_medunet(
        "infer", str(scans), "-o", str(masks), "--model", str(tiny_model), "--stats", str(stats), "--qc", str(qc), "-q"
    )
    assert proc.returncode == 1  # one scan failed: reported, the others finished
    first, summary = error_lines(proc)
    assert first.startswith(f"medunet: error: {scans / 'broken.nii.gz'}: cannot be read")
    assert summary == "medunet: error: 1 of 3 scans failed" and "Traceback" not in proc.stderr
    assert sorted(p.name for p in masks.iterdir()) == ["aniso_img.nii.gz", "iso_img.nii.gz"]
    rows = list(csv.DictReader(stats.open()))
    assert [(r["scan"], r["name"]) for r in rows] == [
        ("aniso_img", "one"), ("aniso_img", "two"), ("iso_img", "one"), ("iso_img", "two")
    ]  # fmt: skip
    for r in rows:
        mask = np.asarray(nib.load(masks / f"{r['scan']}.nii.gz").dataobj)
        assert int(r["voxels"]) == int((mask == int(r["label"])).sum())
        voxel_ml = 0.75 / 1000 if r["scan"] == "aniso_img" else 1 / 1000
        assert float(r["volume_ml"]) == pytest.approx(int(r["voxels"]) * voxel_ml, abs=1e-4)
    for name in ("aniso_img", "iso_img"):
        with Image.open(qc / f"{name}.png") as picture:
            assert picture.width > 300 and picture.height > 200
    assert not (qc / "broken.png").exists()


@pytest.mark.slow
def test_budget_and_window_options(tiny_model: Path, tmp_path: Path) -> None:
    img, _ = make_blob_case(tmp_path, "scan", seed=5)
    out = tmp_path / "m.nii.gz"
    small = run_medunet("infer", str(img), "-o", str(out), "--model", str(tiny_model), "--max-memory", "100MB")
    assert small.returncode == 1 and not out.exists()
    assert error_lines(small)[0].startswith(f"medunet: error: {img}: the memory budget (0.09 GiB) is already taken")
    bad_roi = run_medunet("infer", str(img), "-o", str(out), "--model", str(tiny_model), "--roi", "big")
    assert bad_roi.returncode == 1 and error_lines(bad_roi) == [
        "medunet: error: --roi 'big': write sizes like 96,96,96"
    ]
    ok = run_medunet(
        "infer", str(img), "-o", str(out), "--model", str(tiny_model), "--roi", "16,16,16", "--overlap", "0.5",
        "--postprocess", "largest-component", "--max-memory", "4GB",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "windows 16x16x16 (" in ok.stderr


def test_keep_largest_components() -> None:
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:8, 2:8, 2:8] = 1  # large
    labels[12:14, 12:14, 12:14] = 1  # small, separate
    labels[15:19, 2:6, 2:6] = 2
    labels[2:4, 15:17, 15:17] = 2
    kept = keep_largest_components(torch.from_numpy(labels), 3).numpy()
    assert (kept[2:8, 2:8, 2:8] == 1).all() and (kept[12:14, 12:14, 12:14] == 0).all()
    assert (kept[15:19, 2:6, 2:6] == 2).all() and (kept[2:4, 15:17, 15:17] == 0).all()
    only_2 = keep_largest_components(torch.from_numpy(labels), 3, classes=(2,)).numpy()
    assert (only_2[12:14, 12:14, 12:14] == 1).all() and (only_2[2:4, 15:17, 15:17] == 0).all()
    # the foreground as one: class 2's block touching class 1's large one joins it; the rest goes
    labels[8:12, 2:8, 2:8] = 2
    whole = keep_largest_components(torch.from_numpy(labels), 3, classes=(), foreground=True).numpy()
    assert (whole[2:8, 2:8, 2:8] == 1).all() and (whole[8:12, 2:8, 2:8] == 2).all()
    assert not whole[12:20].any() and not whole[:, 15:].any()


def test_the_model_keeps_the_components_its_validation_chose() -> None:
    """A model whose validation chose class 2's own filter filters just that class; ``--postprocess``
    largest-component filters every class, none nothing; a model that chose no filter filters nothing."""
    from medunet.config import InferConfig
    from medunet.inference.predictor import postprocess

    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:8, 2:8, 2:8] = 1
    labels[12:14, 12:14, 12:14] = 1  # a second component of each class, apart from everything
    labels[15:19, 2:6, 2:6] = 2
    labels[2:4, 15:17, 15:17] = 2
    seg = torch.from_numpy(labels)
    small_1, small_2 = (slice(12, 14),) * 3, (slice(2, 4), slice(15, 17), slice(15, 17))
    chosen = InferConfig(largest_component=True, largest_component_classes=(2,))
    kept = postprocess(seg, chosen, 3, None).numpy()
    assert (kept[small_1] == 1).all() and (kept[small_2] == 0).all()
    every = postprocess(seg, chosen, 3, True).numpy()
    assert (every[small_1] == 0).all() and (every[small_2] == 0).all()
    assert (postprocess(seg, chosen, 3, False).numpy() == labels).all()
    assert (postprocess(seg, InferConfig(largest_component=False), 3, None).numpy() == labels).all()
    old = InferConfig(largest_component=True)  # a model from before the per-class choice: every class
    assert (postprocess(seg, old, 3, None).numpy() == every).all()
    # the foreground step alone (no class's own step passed): class 2's two pieces, apart from each
    # other but both touching class 1, stay; every class's own step would remove the smaller one
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:8, 2:8, 2:8] = 1
    labels[8:12, 2:6, 2:6] = 2  # below class 1
    labels[2:4, 8:10, 2:4] = 2  # beside it, smaller
    labels[15:18, 15:18, 15:18] = 1  # apart from everything
    seg = torch.from_numpy(labels)
    fg_only = InferConfig(largest_component=True, largest_component_foreground=True, largest_component_classes=())
    kept = postprocess(seg, fg_only, 3, None).numpy()
    assert (kept[:15] == labels[:15]).all() and not kept[15:].any()
    fg_and_every = postprocess(seg, replace(fg_only, largest_component_classes=None), 3, None).numpy()
    assert not fg_and_every[2:4, 8:10, 2:4].any() and (fg_and_every[8:12, 2:6, 2:6] == 2).all()


def test_tta_needs_mirroring_and_makes_output_mirror_symmetric(tiny_model: Path, tmp_path: Path) -> None:
    img, _ = make_blob_case(tmp_path, "scan", seed=6)
    refused = run_medunet("infer", str(img), "-o", str(tmp_path / "m.nii.gz"), "--model", str(tiny_model), "--tta")
    assert refused.returncode == 1 and "trained without mirroring" in error_lines(refused)[0]

    model = medunet.load_model(tiny_model)
    model = replace(model, infer=replace(model.infer, tta_axes=(0,)))
    nii = nib.load(img)
    mirrored = tmp_path / "mirrored.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nii.dataobj)[::-1].copy(), nii.affine), mirrored)
    a = medunet.segment(img, model, options=InferOptions(tta=True)).labels.numpy()
    b = medunet.segment(mirrored, model, options=InferOptions(tta=True)).labels.numpy()
    assert (a == b[::-1]).mean() > 0.999
    # TTA's logits are the mean of the plain copy's and the mirrored copy's. Where both copies vote for one class,
    # so does their mean: exact, as a sum of two vectors whose largest entries are both at c is largest at c
    # (measured on the tiny model: the copies agree on 9039 of 13440 voxels, TTA matches all of them).
    plain = medunet.segment(img, model).labels.numpy()
    plain_of_mirrored = medunet.segment(mirrored, model).labels.numpy()[::-1]
    both = plain == plain_of_mirrored
    assert 0 < both.sum() < both.size  # the tiny model is not mirror-symmetric, so TTA has something to decide
    np.testing.assert_array_equal(a[both], plain[both])
    # Where they disagree, the mean sides with either copy about equally often, and with three classes it may pick
    # the third (measured: 2057 plain, 2123 mirrored, 221 neither of 4401; other scans 0.44-0.49 plain, 2.6-5%
    # neither). Bounds, not counts: the counts move whenever the training code changes the tiny model.
    disagree = ~both
    assert 0.25 < (a[disagree] == plain[disagree]).mean() < 0.75
    assert ((a == plain) | (a == plain_of_mirrored))[disagree].mean() > 0.9
    # a model that chose mirrored averaging (infer.tta) averages unless told not to
    averaging = replace(model, infer=replace(model.infer, tta=True))
    np.testing.assert_array_equal(medunet.segment(img, averaging).labels.numpy(), a)
    unaveraged = medunet.segment(img, averaging, options=InferOptions(tta=False)).labels.numpy()
    np.testing.assert_array_equal(unaveraged, plain)
    # ... also through `medunet infer`, where --no-tta overrides it
    payload = load_checkpoint(tiny_model)
    payload["infer"] = {**payload["infer"], "tta": True, "tta_axes": [0]}
    save_checkpoint(payload, chose := tmp_path / "chose_tta.pt")
    for flags, expected in (((), a), (("--no-tta",), plain), (("--tta",), a)):
        out = tmp_path / "mask.nii.gz"
        assert run_medunet("infer", str(img), "-o", str(out), "--model", str(chose), *flags).returncode == 0
        np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), expected)


def expected_ct_frames(data_dir: Path) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """TotalSegmentator's label map of the CT series (liver -> 1, spleen -> 2), on its own RAS grid, and
    the same labels as DICOM frames (rows = +y LPS, columns = +x LPS) per slice position."""
    nii = nib.load(data_dir / "totalseg_examples" / "example_seg_dicom.nii.gz")
    raw = np.asarray(nii.dataobj)
    classes = np.zeros(raw.shape, np.uint8)
    classes[raw == 5], classes[raw == 1] = 1, 2
    assert nib.aff2axcodes(nii.affine) == ("L", "A", "S")
    frames = np.stack([classes[:, ::-1, k].T for k in range(raw.shape[2])])
    z = [float(nii.affine[2, 3] + nii.affine[2, 2] * k) for k in range(raw.shape[2])]
    return classes, frames, z


def test_dicom_seg_of_the_ct_series(data_dir: Path, tmp_path: Path) -> None:
    import highdicom as hd

    classes, frames, z = expected_ct_frames(data_dir)
    affine = nib.load(data_dir / "totalseg_examples" / "example_seg_dicom.nii.gz").affine
    out = write_dicom_seg(
        classes, affine, data_dir.joinpath(*CT), tmp_path / "ct.seg.dcm", ["background", "liver", "spleen"], "test"
    )
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    present = [(c, k) for c in (1, 2) for k in range(frames.shape[0]) if (frames[k] == c).any()]
    assert int(ds.NumberOfFrames) == len(present)  # one frame per non-empty slice and segment
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["liver", "spleen"]
    # references the source series: every source instance, one series UID (derived: the files have none)
    source = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(data_dir.joinpath(*CT).iterdir())]
    referenced = ds.ReferencedSeriesSequence[0]
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        s.file_meta.MediaStorageSOPInstanceUID for s in source
    }
    again = pydicom.dcmread(
        write_dicom_seg(classes, affine, data_dir.joinpath(*CT), tmp_path / "b.dcm", ["b", "l", "s"], "t")
    )
    assert again.ReferencedSeriesSequence[0].SeriesInstanceUID == referenced.SeriesInstanceUID
    # every frame holds the right slice of the right segment
    seg = hd.seg.segread(out)
    pixels = seg.pixel_array
    for i, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = float(group.PlanePositionSequence[0].ImagePositionPatient[2])
        k = int(np.argmin([abs(position - v) for v in z]))
        assert abs(z[k] - position) < 1e-3
        np.testing.assert_array_equal(pixels[i] > 0, frames[k] == number)
    if shutil.which("dciodvfy"):
        report = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors


@pytest.mark.slow
def test_dicom_seg_through_the_cli_leaks_no_identifiers(data_dir: Path, tmp_path: Path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    for f in sorted(data_dir.joinpath(*CT).iterdir())[8:14]:
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JANE", "MRN123456", "19700101"
        ds.save_as(series / f.name)
    out = tmp_path / "out" / "ct.nii.gz"
    model = REPO / "bundles" / "hippocampus_mri_3d"
    proc = run_medunet("infer", str(series), "-o", str(out), "--model", str(model), "--dicom-seg")
    assert proc.returncode == 0, proc.stderr
    seg = pydicom.dcmread(out.parent / "ct.seg.dcm")
    assert seg.Modality == "SEG" and len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 6
    assert str(seg.PatientName) == "DOE^JANE"  # the SEG belongs to the patient's study, as the standard requires
    for secret in ("DOE", "JANE", "MRN123456", "19700101"):
        assert secret not in proc.stdout and secret not in proc.stderr

    nifti = run_medunet("infer", str(REPO / "examples" / "hippocampus_017.nii.gz"), "-o", str(tmp_path / "h.nii.gz"),
                        "--dicom-seg", "-q")  # fmt: skip
    assert nifti.returncode == 1 and "--dicom-seg needs a DICOM series folder" in nifti.stderr
    assert not (tmp_path / "h.nii.gz").exists()


@pytest.mark.slow
def test_unwritable_outputs_are_one_line(tiny_model: Path, tmp_path: Path) -> None:
    img, _ = make_blob_case(tmp_path, "scan", seed=7)
    folder = tmp_path / "a_folder"
    folder.mkdir()
    proc = run_medunet("infer", str(img), "-o", str(tmp_path / "m.nii.gz"), "--model", str(tiny_model),
                       "--stats", str(folder), "-q")  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(error_lines(proc)) == 1 and str(folder) in error_lines(proc)[0]
