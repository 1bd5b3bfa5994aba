"""Fuzzed inputs (hypothesis): broken NIfTI headers and broken DICOM series.

Each case either fails with one line naming the file, or gets a mask on the input's grid; never an
exception of another kind, a hang (hypothesis' deadline), a partial file, or a changed input.
hypothesis generates the cases and, when one fails, shrinks it to the smallest that still does.

The cases run through ``run_jobs``, the batch loop behind ``medunet infer``, with the shipped
hippocampus model loaded once; ``test_fuzz_corpus_through_the_command_line`` runs one case of every
class through the command itself.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medunet.inference import load_model
from medunet.inference.batch import Job, run_jobs
from tests.conftest import REPO

MODEL = REPO / "bundles" / "hippocampus_mri_3d"
SHAPE = (10, 12, 9)
FUZZ = settings(
    max_examples=30,
    deadline=20_000,  # ms per case: a hang fails the test
    derandomize=True,  # the same corpus on every run, so CI is reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Shipped:
    """The loaded model, with a short repr for hypothesis' reports of failing cases."""

    def __init__(self) -> None:
        self.model = load_model(MODEL, device="cpu")

    def __repr__(self) -> str:
        return "hippocampus_mri_3d"


@pytest.fixture(scope="module")
def model() -> Shipped:
    return Shipped()


# --- NIfTI -------------------------------------------------------------------------------------

odd_floats = st.one_of(
    st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf, 1e-30, 1e30]),
    st.floats(min_value=-10, max_value=10, allow_nan=False),
)
header_edits = st.one_of(
    st.tuples(st.just("dim"), st.lists(st.integers(-3, 32_767), min_size=3, max_size=3)),
    st.tuples(st.just("ndim"), st.integers(-1, 9)),
    st.tuples(st.just("pixdim"), st.lists(odd_floats, min_size=3, max_size=3)),
    st.tuples(st.just("quatern"), st.lists(odd_floats, min_size=3, max_size=3)),
    st.tuples(st.just("srow"), st.lists(odd_floats, min_size=12, max_size=12)),
    st.tuples(st.just("datatype"), st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 2304, 77])),
    st.tuples(st.just("scaling"), st.lists(odd_floats, min_size=2, max_size=2)),
    st.tuples(st.just("vox_offset"), st.sampled_from([0.0, 100.0, 353.0, 1e6, -5.0, math.nan])),
)


def broken_nifti(path: Path, edits: list[tuple[str, object]], compressed: bool) -> None:
    """A real-looking scan whose header is edited field by field after nibabel wrote it."""
    data = np.random.default_rng(0).normal(100, 20, SHAPE).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([1.0, 1.2, 1.5, 1.0]))
    hdr = img.header.copy()
    hdr.set_qform(img.affine, code=1)
    hdr.set_sform(img.affine, code=1)
    hdr["vox_offset"] = 352
    for field, value in edits:
        if field == "dim":
            hdr["dim"][1:4] = value
        elif field == "ndim":
            hdr["dim"][0] = value
        elif field == "pixdim":
            hdr["pixdim"][1:4] = value
        elif field == "quatern":
            hdr["quatern_b"], hdr["quatern_c"], hdr["quatern_d"] = value  # type: ignore[misc]
        elif field == "srow":
            values = list(value)  # type: ignore[call-overload]
            hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = values[0:4], values[4:8], values[8:12]
        elif field == "datatype":
            hdr["datatype"] = value
        elif field == "scaling":
            hdr["scl_slope"], hdr["scl_inter"] = value  # type: ignore[misc]
        elif field == "vox_offset":
            hdr["vox_offset"] = value
    raw = hdr.binaryblock + b"\x00" * 4 + data.tobytes(order="F")
    path.write_bytes(gzip.compress(raw, compresslevel=1) if compressed else raw)


def expected_grid(path: Path) -> tuple[tuple[int, ...], np.ndarray] | None:
    """The grid a mask must have, as nibabel reads the file (None where it cannot)."""
    try:
        img = nib.load(str(path))
        return tuple(int(s) for s in img.shape), np.asarray(img.affine)
    except Exception:
        return None


def check_outcome(scan: Path, out: Path, result, before: str) -> str:  # type: ignore[no-untyped-def]
    """The case's outcome ("refused"/"masked"), asserting the guarantees either way."""
    assert hashlib.sha256(scan.read_bytes()).hexdigest() == before, "the input changed"
    leftovers = [p.name for p in out.parent.iterdir() if p != out]
    assert not leftovers, f"partial or stray files: {leftovers}"
    if result.failed:
        ((_, message),) = result.failed
        assert "\n" not in message and str(scan) in message and not out.exists()
        return "refused"
    assert out.exists() and result.written == [out]
    grid = expected_grid(scan)
    assert grid is not None
    mask = nib.load(str(out))
    shape, affine = grid
    assert mask.shape == tuple(s for s in shape if s != 1) or mask.shape == shape
    assert np.allclose(mask.affine, affine, atol=1e-3), (mask.affine, affine)
    return "masked"


@FUZZ
@given(edits=st.lists(header_edits, min_size=1, max_size=3), compressed=st.booleans())
def test_broken_nifti_headers(model, tmp_path_factory, edits, compressed) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("nifti")
    scan = folder / ("scan.nii.gz" if compressed else "scan.nii")
    broken_nifti(scan, edits, compressed)
    before = hashlib.sha256(scan.read_bytes()).hexdigest()
    out = folder / "out" / "mask.nii.gz"
    out.parent.mkdir()
    messages: list[str] = []
    result = run_jobs([Job((scan,), out)], model.model, on_error=messages.append)
    outcome = check_outcome(scan, out, result, before)
    event(f"{outcome}: {'refused ' + messages[0].split(': ', 1)[1][:60] if messages else 'mask on the grid'}")


def test_a_header_claiming_gigabytes_is_refused_before_allocating(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import resource

    scan = tmp_path / "huge.nii.gz"
    broken_nifti(scan, [("dim", [4000, 4000, 4000])], compressed=True)  # 238 GiB of float32 in a few KiB
    out = tmp_path / "out" / "mask.nii.gz"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_jobs([Job((scan,), out)], model.model, on_error=lambda _m: None)
    ((_, message),) = result.failed
    assert "header claims (4000, 4000, 4000) voxels (238.4 GiB), more than the" in message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # KiB: nothing that size
    assert not out.parent.exists() or not any(out.parent.iterdir())


# --- DICOM -------------------------------------------------------------------------------------

DEFECTS = [
    "none",
    "non_image_object",
    "other_series_details",  # one slice with another series number and thickness: still one series
    "missing_position",
    "other_orientation",
    "other_size",
    "duplicated_position",
    "missing_slice",
    "uneven_spacing",
    "truncated_file",
]
REFUSED = set(DEFECTS) - {"none", "non_image_object", "other_series_details"}


def dicom_slice(path: Path, series: str, k: int, position: list[float] | None, rows: int, cols: int) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "MR", series, "1.2.3.4"
    ds.FrameOfReferenceUID, ds.InstanceNumber = "1.2.3.5", k + 1
    if position is not None:
        ds.ImagePositionPatient = position
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 2.0
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    rng = np.random.default_rng(k)
    ds.PixelData = rng.integers(0, 400, (rows, cols), dtype=np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def broken_series(folder: Path, defect: str, n: int, step: float, rows: int, cols: int, which: int) -> None:
    folder.mkdir()
    uid = generate_uid()
    positions = [[0.0, 0.0, k * step] for k in range(n)]
    which %= n
    if defect == "missing_slice":
        del positions[max(1, min(which, n - 2))]
    if defect == "uneven_spacing":
        positions[max(1, which)][2] += 0.4 * step
    if defect == "duplicated_position":
        positions[max(1, which)] = list(positions[max(1, which) - 1])
    for k, pos in enumerate(positions):
        r, c = (rows + 2, cols) if defect == "other_size" and k == which else (rows, cols)
        dicom_slice(
            folder / f"im{k:03d}.dcm", uid, k, None if defect == "missing_position" and k == which else pos, r, c
        )
    if defect == "other_orientation":
        ds = pydicom.dcmread(folder / f"im{which:03d}.dcm")
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.save_as(folder / f"im{which:03d}.dcm")
    if defect == "other_series_details":
        ds = pydicom.dcmread(folder / f"im{which:03d}.dcm")
        ds.SeriesNumber, ds.SliceThickness = 7, 3.0
        ds.save_as(folder / f"im{which:03d}.dcm")
    if defect == "truncated_file":
        victim = folder / f"im{max(1, min(which, n - 2)):03d}.dcm"
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size - 100])
    if defect == "non_image_object":
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.BasicTextSRStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        sr = FileDataset(str(folder / "report.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        sr.SOPClassUID, sr.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        sr.Modality, sr.SeriesInstanceUID = "SR", generate_uid()
        sr.save_as(folder / "report.dcm", enforce_file_format=True)


def folder_digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.iterdir()))).hexdigest()


@FUZZ
@given(
    defect=st.sampled_from(DEFECTS),
    n=st.integers(3, 8),
    step=st.floats(0.5, 6.0),
    size=st.sampled_from([(16, 16), (12, 20)]),
    which=st.integers(0, 7),
)
def test_broken_dicom_series(model, tmp_path_factory, defect, n, step, size, which) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("dicom")
    series = root / "series"
    broken_series(series, defect, n, step, *size, which)
    before = folder_digest(series)
    out = root / "out" / "mask.nii.gz"
    out.parent.mkdir()
    result = run_jobs([Job((series,), out)], model.model, on_error=lambda _m: None)
    assert folder_digest(series) == before, "the input changed"
    assert [p.name for p in out.parent.iterdir() if p != out] == []
    event(f"{defect}: {'refused' if result.failed else 'mask'}")
    if defect in REFUSED:
        ((_, message),) = result.failed
        assert message.startswith(f"{series}: DICOM series 1: ") and "\n" not in message
        assert "refused (--accept-damaged-series" in message and not out.exists()
    else:
        assert not result.failed, result.failed
        rows, cols = size
        assert nib.load(str(out)).shape == (cols, rows, n)


def test_fuzz_corpus_through_the_command_line(tmp_path: Path) -> None:
    """One case of each class through ``medunet infer`` on a folder: one line per refused scan, the
    others written, no traceback, no stray file."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    broken_nifti(corpus / "nan_spacing.nii.gz", [("pixdim", [math.nan, 1.0, 1.0])], True)
    broken_nifti(corpus / "zero_dim.nii", [("dim", [0, 12, 9])], False)
    broken_nifti(corpus / "huge.nii.gz", [("dim", [4000, 4000, 4000])], True)
    broken_nifti(corpus / "nan_scaling.nii.gz", [("scaling", [math.nan, math.nan])], True)
    broken_nifti(corpus / "singular_sform.nii.gz", [("srow", [0.0] * 12)], True)
    broken_nifti(corpus / "wrong_datatype.nii", [("datatype", 64)], False)
    broken_series(corpus / "gap", "missing_slice", 6, 2.0, 16, 16, 3)
    broken_series(corpus / "good", "non_image_object", 5, 2.0, 16, 16, 0)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "medunet", "infer", str(corpus), "-o", str(out), "--model", str(MODEL), "-q"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("medunet: error: ")]
    refused = {Path(line.split(": ")[2]).name for line in errors[:-1]}
    written = {p.name for p in out.iterdir()}
    names = {"nan_spacing", "zero_dim", "huge", "nan_scaling", "singular_sform", "wrong_datatype", "gap", "good"}
    assert {n.split(".")[0] for n in refused} | {n.split(".")[0] for n in written} == names
    assert not {n.split(".")[0] for n in refused} & {n.split(".")[0] for n in written}
    assert {"huge.nii.gz", "gap", "wrong_datatype.nii"} <= refused and "good.nii.gz" in written
    assert errors[-1] == f"medunet: error: {len(refused)} of 8 scans failed" and proc.returncode == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
