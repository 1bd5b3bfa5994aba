"""Dataset layouts: each is detected on its own and read into the same cases."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medunet.data.layouts import detect_layout, read_dataset, shared_scan_stems
from medunet.errors import InputError
from tests.conftest import make_blob_case


def _nnunet(root: Path, names: list[str], channels: int = 1) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i, name in enumerate(names):
        img, lab = make_blob_case(root / "tmp", name, seed=i)
        for c in range(channels):
            (root / "imagesTr" / f"{name}_{c:04d}.nii.gz").write_bytes(img.read_bytes())
        lab.rename(root / "labelsTr" / f"{name}.nii.gz")
    meta = {
        "channel_names": {str(c): ("CT" if c == 0 else f"ch{c}") for c in range(channels)},
        "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": len(names),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_nnunet_layout_reads_channels_labels_and_groups_scans_of_one_patient(tmp_path: Path) -> None:
    names = ["patient001_frame01", "patient001_frame12", "patient002_frame01", "patient002_frame09"]
    root = _nnunet(tmp_path / "ds", names, channels=2)
    assert detect_layout(root) == "nnunet"
    ds = read_dataset(root)
    assert [c.case_id for c in ds.cases] == names
    assert ds.channels == ("CT", "ch1")
    assert ds.labels == {"background": 0, "a": 1, "b": 2}
    assert [len(c.images) for c in ds.cases] == [2, 2, 2, 2]
    assert [c.patient_id for c in ds.cases] == ["patient001", "patient001", "patient002", "patient002"]
    assert "grouped by their common stem" in ds.grouping
    alone = read_dataset(root, patient_regex="(.*)")
    assert [c.patient_id for c in alone.cases] == names


def test_patient_regex_takes_its_first_group_and_refuses_a_case_it_does_not_match(tmp_path: Path) -> None:
    root = _nnunet(tmp_path / "ds", ["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1"])
    assert [c.patient_id for c in read_dataset(root, r"(sub-\d+)").cases] == ["sub-01", "sub-01", "sub-02"]
    with pytest.raises(ValueError, match="finds no patient id"):
        read_dataset(root, r"(patient\d+)")
    with pytest.raises(ValueError, match="needs a group"):
        read_dataset(root, r"sub")


def test_numbered_cases_are_each_their_own_patient() -> None:
    assert shared_scan_stems([f"hippocampus_{i:03d}" for i in range(10)]) is None
    assert shared_scan_stems(["a_frame01", "b_frame01"]) is None  # no stem shared
    assert shared_scan_stems(["p1_ED", "p1_ES", "p2_ED", "p2_ES"]) == ["p1", "p1", "p2", "p2"]


def test_msd_layout_with_4d_images(tmp_path: Path) -> None:
    root = tmp_path / "Task05"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(3):
        img, lab = make_blob_case(tmp_path / "tmp", f"prostate_{i:02d}", seed=i)
        data = np.asarray(nib.load(str(img)).dataobj)
        four = np.stack([data, -data], axis=-1)
        nib.save(nib.Nifti1Image(four, np.eye(4)), str(root / "imagesTr" / f"prostate_{i:02d}.nii.gz"))
        lab.rename(root / "labelsTr" / f"prostate_{i:02d}.nii.gz")
        training.append(
            {"image": f"./imagesTr/prostate_{i:02d}.nii.gz", "label": f"./labelsTr/prostate_{i:02d}.nii.gz"}
        )
    meta = {
        "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = read_dataset(root)
    assert ds.layout.startswith("Medical Segmentation Decathlon")
    assert ds.channels == ("T2", "ADC") and ds.channels_in_file
    assert ds.labels == {"background": 0, "PZ": 1, "TZ": 2}

    from medunet.io import load_image

    img = load_image(ds.cases[0].images, spatial_dims=3, channels_in_file=2)
    assert tuple(img.shape) == (2, 24, 28, 20)
    assert np.allclose(img[0].numpy(), -img[1].numpy())


def test_folders_layout_on_real_hippocampus_data(data_dir: Path) -> None:
    ds = read_dataset(data_dir / "msd_hippocampus")
    assert ds.layout.startswith("images/")
    assert len(ds.cases) == 200 and ds.patients == 200
    assert all(c.label is not None and c.label.name == c.images[0].name for c in ds.cases)


def test_acdc_is_grouped_by_patient(data_dir: Path) -> None:
    ds = read_dataset(data_dir / "acdc_cardiac")
    assert len(ds.cases) == 160 and ds.patients == 80
    assert ds.labels == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}


def test_not_a_dataset_says_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a dataset"):
        read_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(InputError, match="neither nnU-Net"):
        read_dataset(tmp_path)


def test_stray_files_are_problems_of_the_dataset(tmp_path: Path) -> None:
    root = _nnunet(tmp_path / "nn", ["case_a", "case_b"])
    (root / "imagesTr" / "case_a_0001.nii.gz").write_bytes(b"")  # a channel dataset.json does not declare
    (root / "imagesTr" / "case_c.nii.gz").write_bytes(b"")  # no channel number
    (root / "imagesTr" / "notes.txt").write_text("not an image of this dataset")
    (root / "labelsTr" / "case_d.nii.gz").write_bytes(b"")  # no image
    ds = read_dataset(root)
    assert [c.case_id for c in ds.cases] == ["case_a", "case_b"]
    assert len(ds.problems) == 3, ds.problems
    assert "case_a_0001.nii.gz: channel 1 is not in dataset.json's channel_names (1)" in ds.problems[0]
    assert "case_c.nii.gz: not named <case>_<4-digit channel>.nii.gz" in ds.problems[1]
    assert "case_d.nii.gz: label without an image" in ds.problems[2]
    folders = tmp_path / "folders"
    (folders / "images").mkdir(parents=True)
    (folders / "labels").mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (folders / "images" / name).write_bytes(b"")
        (folders / "labels" / name).write_bytes(b"")
    (folders / "labels" / "c.nii.gz").write_bytes(b"")
    ds = read_dataset(folders)
    assert len(ds.cases) == 2 and len(ds.problems) == 1 and "c.nii.gz: label without an image" in ds.problems[0]
