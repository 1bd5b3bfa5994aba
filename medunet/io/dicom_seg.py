"""DICOM Segmentation objects (highdicom) for masks of DICOM series, so PACS viewers and 3D Slicer show
them over the scan.

The SEG references the source series and carries one segment per foreground label with its name.
highdicom copies from the source only the patient, study and frame-of-reference attributes the SEG
IOD requires; nothing from the source headers is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medunet.errors import InputError
from medunet.io.writers import atomic_path

log = logging.getLogger(__name__)

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def series_files(folder: Path, series: str | None = None) -> list[Path]:
    """The files of the series that was read from ``folder`` (chosen as ``load_image`` chose it)."""
    from medunet.io.dicom_series import choose_series, scan_folder

    return choose_series(folder, scan_folder(folder), series).files


def restore_identifiers(datasets: Sequence, source: Path) -> None:
    """Fill the UIDs a SEG must reference where a de-identified series left them empty.

    SOP class and instance UIDs come from each file's meta header (the same values). A missing study
    or series UID is derived from the instances' UIDs, so the same series always gets the same one.
    """
    from pydicom.uid import generate_uid

    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        for key, meta_key in (
            ("SOPClassUID", "MediaStorageSOPClassUID"),
            ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
        ):
            if not ds.get(key) and meta is not None and meta.get(meta_key):
                setattr(ds, key, meta.get(meta_key))
        if not ds.get("SOPInstanceUID") or not ds.get("SOPClassUID"):
            raise InputError(source, "an image of the series has no SOP instance or class UID; cannot reference it")
    instances = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        values = {str(ds.get(key) or "") for ds in datasets}
        if values == {""}:
            uid = generate_uid(entropy_srcs=[key, *instances])
            for ds in datasets:
                setattr(ds, key, uid)
            log.warning("%s: the series has no %s; the SEG uses one derived from its instance UIDs", source, key)
        elif "" in values or len(values) > 1:
            raise InputError(source, f"the images of the series disagree on {key}")


def frames_from_volume(labels: np.ndarray, affine: np.ndarray, datasets: Sequence) -> np.ndarray:
    """``(instances, rows, columns)`` label frames: each source image's pixels looked up in ``labels``
    (on the grid of ``affine``, RAS) through its own position, orientation and pixel spacing."""
    to_voxel = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ LPS_FROM_RAS
    frames = np.zeros((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), dtype=labels.dtype)
    for k, ds in enumerate(datasets):
        origin = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        orient = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        along_row, along_col = orient[:3] * col_spacing, orient[3:] * row_spacing
        v0 = to_voxel @ np.append(origin, 1.0)
        dc = to_voxel[:3, :3] @ along_row  # one column to the right
        dr = to_voxel[:3, :3] @ along_col  # one row down
        rows, cols = int(ds.Rows), int(ds.Columns)
        r = np.arange(rows)[:, None, None]
        c = np.arange(cols)[None, :, None]
        index = v0[:3] + c * dc + r * dr  # (rows, cols, 3)
        nearest = np.rint(index)
        if np.abs(index - nearest).max() > 0.05 or (nearest < 0).any() or (nearest >= labels.shape).any():
            raise ValueError("the mask's grid does not match the DICOM series' geometry")
        idx = nearest.astype(np.intp)
        frames[k] = labels[idx[..., 0], idx[..., 1], idx[..., 2]]
    return frames


def write_dicom_seg(
    labels: np.ndarray,
    affine: np.ndarray,
    source: Path,
    output: Path,
    label_names: Sequence[str],
    algorithm: str,
    series: str | None = None,
) -> Path:
    """Write ``labels`` (class indices, 0 = background, on the series' grid) as a binary DICOM SEG with
    one segment per foreground class; empty frames are left out."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from medunet import __version__

    if not source.is_dir():
        raise InputError(source, "--dicom-seg needs a DICOM series folder as input")
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_files(source, series)]
    restore_identifiers(datasets, source)
    try:
        frames = frames_from_volume(labels, affine, datasets)
    except ValueError as exc:
        raise InputError(source, str(exc)) from None
    except (AttributeError, KeyError, TypeError) as exc:  # e.g. no ImagePositionPatient or PixelSpacing
        raise InputError(source, f"the series lacks the plane geometry a DICOM SEG needs ({exc})") from None
    if labels.max() == 0:
        raise InputError(source, "--dicom-seg: the mask is empty, and a DICOM SEG needs at least one segment")
    present = sorted(int(v) for v in np.unique(frames) if v > 0)
    number = {c: i + 1 for i, c in enumerate(present)}  # SEG segments are numbered 1..n without gaps
    lut = np.zeros(max(len(label_names), int(frames.max()) + 1), dtype=np.uint8)
    for c, n in number.items():
        lut[c] = n
    family = codes.cid7162.ArtificialIntelligence
    algo = hd.AlgorithmIdentificationSequence(name="medunet", version=__version__, family=family)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number[c],
            segment_label=label_names[c][:64],
            segmented_property_category=codes.cid7150.Tissue,
            segmented_property_type=hd.sr.CodedConcept(
                value=f"MEDUNET{c}", scheme_designator="99MEDUNET", meaning=label_names[c][:64]
            ),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
        )
        for c in present
    ]
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=lut[frames],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=9901,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="medunet",
            manufacturer_model_name=algorithm[:64] or "medunet",
            software_versions=__version__,
            device_serial_number="none",
            series_description="medunet segmentation",
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a source image highdicom cannot reference
        raise InputError(source, f"cannot make a DICOM SEG for this series ({exc})") from None
    with atomic_path(output) as tmp:
        seg.save_as(tmp)
    return output
