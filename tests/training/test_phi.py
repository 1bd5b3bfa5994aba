"""Patient identifiers in DICOM headers never leave the scans: training from DICOM series whose headers
hold a name, an id and a birth date writes none of them to the run folder, the MLflow store (params,
tags, metrics, artifacts, the logged bundle) or the command's output."""

from __future__ import annotations

import gzip
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medunet.io import load_image, write_array
from tests.conftest import TINY_YAML, make_blob_case

SECRETS = ("PLANTED", "Quixote", "MRN99887766", "19450203")


def write_series(folder: Path, image: np.ndarray) -> None:
    """``image`` (X, Y, Z) as one CT slice per z, with the planted patient module."""
    folder.mkdir(parents=True)
    series, study = generate_uid(), generate_uid()
    for k in range(image.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "PLANTED^Quixote", "MRN99887766", "19450203"
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series, study
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, float(k)], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
        ds.Rows, ds.Columns = image.shape[1], image.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(image[:, :, k].T.astype(np.int16)).tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)


def readable_texts(path: Path) -> list[bytes]:
    """The file's bytes, and its contents where it is a gzip stream or a zip archive (checkpoints)."""
    raw = path.read_bytes()
    texts = [raw]
    if raw[:2] == b"\x1f\x8b":
        texts.append(gzip.decompress(raw))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            texts += [archive.read(name) for name in archive.namelist()]
    return texts


@pytest.mark.slow
def test_training_from_dicom_series_leaks_no_patient_identifier(tmp_path: Path) -> None:
    data, work = tmp_path / "data", tmp_path / "work"
    rows = ["image,label,patient_id"]
    for i in range(4):
        img, lab = make_blob_case(tmp_path / "blobs", f"c{i}", seed=i)
        import nibabel as nib

        series = data / f"series{i}"
        write_series(series, np.asarray(nib.load(img).dataobj))
        loaded = load_image(series, spatial_dims=3)
        assert np.array_equal(loaded[0].numpy(), np.asarray(nib.load(img).dataobj).astype(np.int16))
        label = data / f"label{i}.nii.gz"
        write_array(np.asarray(nib.load(lab).dataobj), np.asarray(loaded.affine), label)
        rows.append(f"{series},{label},p{i}")
    work.mkdir()
    (work / "manifest.csv").write_text("\n".join(rows) + "\n")
    (work / "tiny.yaml").write_text(TINY_YAML.format(manifest="manifest.csv"))
    proc = subprocess.run(
        [sys.executable, "-m", "medunet", "train", "--config", "tiny.yaml", "--output", "run", "--epochs", "2",
         "--register", "phi_check"],
        capture_output=True, cwd=work, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert (work / "mlflow.db").exists() and (work / "run" / "best.pt").exists()
    checked = 0
    for path in [p for p in work.rglob("*") if p.is_file()]:
        for text in readable_texts(path):
            for secret in SECRETS:
                assert secret.encode() not in text, f"{secret} found in {path}"
        checked += 1
    assert checked > 10  # the run folder, the SQLite store and the artifacts (bundle, model) were read
    for secret in SECRETS:
        assert secret.encode() not in proc.stdout + proc.stderr
