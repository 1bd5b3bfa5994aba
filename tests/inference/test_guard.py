"""The input guard: silent on the scans a model was trained on, loud on scans unlike them (real data)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medunet.errors import MedunetError
from medunet.inference.guard import TrainingRange, check_scan
from medunet.io import load_image
from tests.conftest import REPO

HIPPOCAMPUS_BUNDLE = REPO / "bundles" / "hippocampus_mri_3d"
ACDC_BUNDLE = REPO / "bundles" / "acdc_cardiac_mri_3d"


def training_range(bundle: Path) -> TrainingRange:
    return TrainingRange.from_fingerprint(json.loads((bundle / "configs" / "fingerprint.json").read_text()))


def codes(flags: list) -> set[str]:
    return {f.code for f in flags}


@pytest.fixture(scope="module")
def hippocampus() -> TrainingRange:
    return training_range(HIPPOCAMPUS_BUNDLE)


@pytest.fixture(scope="module")
def acdc() -> TrainingRange:
    return training_range(ACDC_BUNDLE)


def manifest_scans(data_dir: Path) -> list[Path]:
    """The images of the cases the default model was trained and validated on, found under ``data_dir``."""
    with (REPO / "data_manifests" / "msd_hippocampus_3d.csv").open() as f:
        names = [Path(row["image"]).name for row in csv.DictReader(f)]
    return [data_dir / "msd_hippocampus" / "images" / name for name in names]


@pytest.fixture(scope="module")
def hippocampus_scan(data_dir: Path) -> MetaTensor:
    return load_image(data_dir / "msd_hippocampus" / "images" / "hippocampus_004.nii.gz")


def like(scan: MetaTensor, values: torch.Tensor, affine: np.ndarray | torch.Tensor | None = None) -> MetaTensor:
    return MetaTensor(values, affine=scan.affine if affine is None else affine)


# --- TrainingRange.from_fingerprint --------------------------------------------------------------


def case(shape: list[int], spacing: list[float], lo: float, hi: float, nonzero: float) -> dict:
    return {
        "shape": shape,
        "spacing": spacing,
        "intensity": [{"mean": 0.0, "std": 1.0, "min": lo, "max": hi, "nonzero_fraction": nonzero}],
    }


def fingerprint(name: str) -> dict:
    return {
        "format": "medunet-fingerprint/1",
        "modalities": [name],
        "channels": [{"name": name, "foreground_percentiles": {"0.5": -50.0, "50.0": 60.0, "99.5": 250.0}}],
        "cases": [
            case([100, 200, 30], [0.8, 0.8, 5.0], -1024.0, 2048.0, 0.9),
            case([120, 100, 50], [1.0, 0.7, 2.5], -1000.0, 1000.0, 1.0),
        ],
    }


def test_range_from_a_hand_written_fingerprint() -> None:
    r = TrainingRange.from_fingerprint(fingerprint(" ct "))
    assert r.axes == ("R", "A", "S") and r.cases == 2 and r.modalities == (" ct ",)
    assert r.spacing == ((0.8, 1.0), (0.7, 0.8), (2.5, 5.0))
    np.testing.assert_allclose(r.extent, ((80.0, 120.0), (70.0, 160.0), (125.0, 150.0)))
    (ch,) = r.channels
    assert ch.ct  # named CT, whatever the case and spaces, as the planning rules read it
    assert ch.case_min == (-1024.0, -1000.0)
    assert ch.low_ratio == pytest.approx((-1.0, -0.5))
    assert ch.zero_share == pytest.approx((0.0, 0.1))
    assert ch.foreground == (-50.0, 60.0, 250.0)
    assert not TrainingRange.from_fingerprint(fingerprint("T2")).channels[0].ct


def test_a_malformed_fingerprint_is_refused() -> None:
    with pytest.raises(MedunetError, match="format"):
        TrainingRange.from_fingerprint({"format": "other"})
    broken = fingerprint("CT")
    del broken["cases"][1]["spacing"]
    with pytest.raises(MedunetError, match="malformed"):
        TrainingRange.from_fingerprint(broken)


def test_the_default_model_carries_its_fingerprint(hippocampus: TrainingRange) -> None:
    from medunet.inference import load_model

    fp = load_model(HIPPOCAMPUS_BUNDLE).fingerprint
    assert fp is not None and len(fp["cases"]) == 200
    assert TrainingRange.from_fingerprint(fp) == hippocampus


# --- no flag on the training data ----------------------------------------------------------------


def test_no_flag_on_any_training_case(data_dir: Path, hippocampus: TrainingRange) -> None:
    """All 200 cases of the manifest (about a second: the crops are small)."""
    scans = manifest_scans(data_dir)
    on_disk = sorted((data_dir / "msd_hippocampus" / "images").glob("*.nii.gz"))
    scans += [p for p in on_disk if p not in scans]  # any case of the folder the manifest does not list
    flagged = {p.name: check_scan(load_image(p), hippocampus) for p in scans}
    assert len(flagged) >= 200 and not any(flagged.values()), {k: v for k, v in flagged.items() if v}


def test_scale_and_orientation_do_not_matter(hippocampus_scan: MetaTensor, hippocampus: TrainingRange) -> None:
    """MRI intensities have no fixed scale, and a scan may be stored in any orientation."""
    values = hippocampus_scan.as_tensor()
    for factor in (1e-3, 1e3):
        assert check_scan(like(hippocampus_scan, values * factor), hippocampus) == []
    flipped = np.asarray(hippocampus_scan.affine) @ np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS
    swapped = flipped[:, [1, 2, 0, 3]]  # stored A, S, R
    moved = values.flip(1).permute(0, 2, 3, 1).contiguous()
    assert check_scan(like(hippocampus_scan, moved, swapped), hippocampus) == []
    swapped[:3, 1] *= 10  # the stored second axis is S: 10 mm slices
    (flag, *_) = check_scan(like(hippocampus_scan, moved, swapped), hippocampus)
    assert flag.code == "spacing" and "10 mm along S" in flag.message


def test_no_flag_on_the_cardiac_model_own_cases(data_dir: Path, acdc: TrainingRange) -> None:
    scans = sorted((data_dir / "acdc_cardiac" / "imagesTr").glob("*.nii.gz"))[::8]
    flagged = {p.name: check_scan(load_image(p), acdc) for p in scans}
    assert len(flagged) == 20 and not any(flagged.values()), {k: v for k, v in flagged.items() if v}


# --- flags on scans unlike the training data -----------------------------------------------------


def test_ct_given_to_the_mri_model(data_dir: Path, hippocampus: TrainingRange) -> None:
    flags = check_scan(load_image(data_dir / "totalseg_examples" / "example_ct.nii.gz"), hippocampus)
    assert codes(flags) == {"modality", "spacing", "size"}
    modality = next(f for f in flags if f.code == "modality")
    assert "CT" in modality.message and "36%" in modality.message


def test_abdominal_mr_given_to_the_hippocampus_model(data_dir: Path, hippocampus: TrainingRange) -> None:
    flags = check_scan(load_image(data_dir / "totalseg_examples" / "example_mr_sm.nii.gz"), hippocampus)
    assert codes(flags) == {"spacing", "size"}  # an MRI, but at 3 mm and 35 cm wide


def test_blank_volume(hippocampus_scan: MetaTensor, hippocampus: TrainingRange) -> None:
    (flag,) = check_scan(like(hippocampus_scan, torch.zeros_like(hippocampus_scan.as_tensor())), hippocampus)
    assert flag.code == "blank" and "every voxel" in flag.message


def test_nearly_blank_volume(hippocampus_scan: MetaTensor, hippocampus: TrainingRange) -> None:
    values = torch.zeros_like(hippocampus_scan.as_tensor())
    values[0, :2, :3, :4] = 7.0
    assert codes(check_scan(like(hippocampus_scan, values), hippocampus)) == {"blank"}


def test_spacing_ten_times_coarser(hippocampus_scan: MetaTensor, hippocampus: TrainingRange) -> None:
    affine = np.asarray(hippocampus_scan.affine).copy()
    affine[:3, 2] *= 10
    flags = check_scan(like(hippocampus_scan, hippocampus_scan.as_tensor(), affine), hippocampus)
    assert codes(flags) == {"spacing", "size"}
    assert flags[0].message.startswith("spacing 10 mm along S is 10.0x coarser")


def test_small_crop(hippocampus_scan: MetaTensor, hippocampus: TrainingRange) -> None:
    crop = hippocampus_scan.as_tensor()[:, 10:18, 10:18, 10:18].clone()
    (flag,) = check_scan(like(hippocampus_scan, crop), hippocampus)
    assert flag.code == "size" and flag.message.startswith("extent 8 mm along")


def test_hippocampus_given_to_the_cardiac_model(hippocampus_scan: MetaTensor, acdc: TrainingRange) -> None:
    assert codes(check_scan(hippocampus_scan, acdc)) == {"spacing", "size"}


def test_intensity_shapes_unlike_training(hippocampus_scan: MetaTensor, hippocampus: TrainingRange) -> None:
    values = hippocampus_scan.as_tensor()
    centred = values - values.median()  # z-scored elsewhere: half the voxels negative
    assert codes(check_scan(like(hippocampus_scan, centred), hippocampus)) == {"intensity"}
    offset = values + 10 * values.max()  # no dark voxels at all
    assert codes(check_scan(like(hippocampus_scan, offset), hippocampus)) == {"intensity"}
    padded = torch.zeros(1, 50, 60, 50)  # three quarters zero padding, within the training extents
    padded[:, :35, :50, :36] = values[:, :35, :50, :36]
    assert codes(check_scan(like(hippocampus_scan, padded), hippocampus)) == {"intensity"}
    nan = values.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert codes(check_scan(like(hippocampus_scan, nan), hippocampus)) == {"invalid"}


def test_wrong_channel_count(hippocampus_scan: MetaTensor, hippocampus: TrainingRange) -> None:
    two = like(hippocampus_scan, hippocampus_scan.as_tensor().repeat(2, 1, 1, 1))
    assert codes(check_scan(two, hippocampus)) == {"channels"}


# --- a CT model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_model_range(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainingRange:
    """The range of a CT model trained on the TotalSegmentator CT (its organs as one foreground)."""
    from medunet.data.layouts import read_dataset
    from medunet.planning.fingerprint import fingerprint_dataset

    root = tmp_path_factory.mktemp("ct_dataset")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    (root / "imagesTr" / "ct_0000.nii.gz").symlink_to(data_dir / "totalseg_examples" / "example_ct_sm.nii.gz")
    seg = nib.load(data_dir / "totalseg_examples" / "example_seg.nii.gz")
    organs = (np.asarray(seg.dataobj) > 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(organs, seg.affine), root / "labelsTr" / "ct.nii.gz")
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": 1}))
    fp = fingerprint_dataset(read_dataset(root), workers=1, progress=False, use_cache=False)
    return TrainingRange.from_fingerprint(fp)


def test_ct_model_accepts_its_ct(data_dir: Path, ct_model_range: TrainingRange) -> None:
    assert ct_model_range.channels[0].ct
    assert check_scan(load_image(data_dir / "totalseg_examples" / "example_ct_sm.nii.gz"), ct_model_range) == []


def test_mri_given_to_a_ct_model(data_dir: Path, ct_model_range: TrainingRange, hippocampus_scan: MetaTensor) -> None:
    mr = check_scan(load_image(data_dir / "totalseg_examples" / "example_mr_sm.nii.gz"), ct_model_range)
    assert codes(mr) == {"modality"} and "Hounsfield" in mr[0].message
    assert "modality" in codes(check_scan(hippocampus_scan, ct_model_range))


def test_ct_far_from_the_training_hounsfield_range(data_dir: Path, ct_model_range: TrainingRange) -> None:
    ct = load_image(data_dir / "totalseg_examples" / "example_ct_sm.nii.gz")
    assert codes(check_scan(like(ct, ct.as_tensor() - 2000), ct_model_range)) == {"intensity"}
