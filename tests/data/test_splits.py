from __future__ import annotations

from pathlib import Path

import pytest

from medunet.data import Case, kfold_by_patient, read_manifest, split_by_patient

REPO = Path(__file__).resolve().parents[2]


def cases(n_patients: int = 20, per_patient: int = 3) -> list[Case]:
    return [
        Case(f"p{p}_s{s}", (Path(f"p{p}_s{s}.nii.gz"),), None, f"p{p}")
        for p in range(n_patients)
        for s in range(per_patient)
    ]


def patients(cs: list[Case]) -> set[str]:
    return {c.patient_id for c in cs}


def test_split_never_shares_a_patient() -> None:
    train, val = split_by_patient(cases(), 0.2, seed=3)
    assert not patients(train) & patients(val)
    assert len(patients(val)) == 4 and len(train) + len(val) == 60


def test_split_is_deterministic_per_seed() -> None:
    a = split_by_patient(cases(), 0.2, seed=1)
    b = split_by_patient(cases(), 0.2, seed=1)
    c = split_by_patient(cases(), 0.2, seed=2)
    assert a == b
    assert patients(a[1]) != patients(c[1])


def test_folds_partition_patients() -> None:
    all_val: list[str] = []
    for k in range(5):
        train, val = kfold_by_patient(cases(), 5, k, seed=0)
        assert not patients(train) & patients(val)
        all_val += sorted(patients(val))
    assert sorted(all_val) == sorted(patients(cases())) and len(set(all_val)) == 20


def test_explicit_split_column_wins_and_is_checked() -> None:
    cs = [
        Case("a", (Path("a"),), None, "p1", "train"),
        Case("b", (Path("b"),), None, "p2", "val"),
        Case("c", (Path("c"),), None, "p3", "test"),
    ]
    train, val = split_by_patient(cs, 0.5, 0)
    assert [c.case_id for c in train] == ["a"] and [c.case_id for c in val] == ["b"]
    bad = [*cs, Case("d", (Path("d"),), None, "p1", "val")]
    with pytest.raises(ValueError, match="both sides"):
        split_by_patient(bad, 0.5, 0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        split_by_patient(cases(), 1.5, 0)
    with pytest.raises(ValueError, match="cannot fill"):
        kfold_by_patient(cases(3), 5, 0, 0)


@pytest.mark.parametrize(
    "manifest",
    ["msd_hippocampus_3d.csv", "msd_hippocampus_2d_slices.csv", "brats2015_3d.csv", "isbi2012_membrane_2d.csv"],
)
def test_shipped_manifests_split_by_patient(manifest: str, data_dir: Path) -> None:
    cs = read_manifest(REPO / "data_manifests" / manifest)
    train, val = split_by_patient(cs, 0.2, seed=0)
    assert train and val
    assert not patients(train) & patients(val)


def test_slice_view_keeps_patient_ids(data_dir: Path) -> None:
    cs = read_manifest(REPO / "data_manifests" / "msd_hippocampus_2d_slices.csv")
    assert all(c.slice_index is not None for c in cs)
    assert len(patients(cs)) == 200
    _, val = split_by_patient(cs, 0.2, seed=0)
    assert len(patients(val)) == 40 and len(val) > 1000


def test_brats_manifest_has_two_channels(data_dir: Path) -> None:
    cs = read_manifest(REPO / "data_manifests" / "brats2015_3d.csv")
    assert len(cs) == 6 and all(len(c.images) == 2 for c in cs)


def test_manifest_errors_name_the_file(tmp_path: Path) -> None:
    m = tmp_path / "m.csv"
    m.write_text("image,label,patient_id\nmissing.nii.gz,,p1\n")
    with pytest.raises(Exception, match=r"m\.csv: line 2: .*missing\.nii\.gz does not exist"):
        read_manifest(m)
    m.write_text("image,label\na,b\n")
    with pytest.raises(Exception, match="lacks column"):
        read_manifest(m)
