"""Reading images through MONAI's ``LoadImage`` with the right reader for each format.

Every reader returns a channel-first ``MetaTensor`` ``(C, *S)`` whose ``affine`` (RAS, as MONAI
keeps it) places the voxels in the world; that affine is what the written mask carries.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.image_reader import ImageReader, ITKReader, NibabelReader, PILReader
from monai.transforms import LoadImage
from nibabel.arrayproxy import ArrayProxy

from medunet.errors import InputError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
IMAGE_2D_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
SUPPORTED = NIFTI_SUFFIXES + ITK_SUFFIXES + IMAGE_2D_SUFFIXES


def has_suffix(path: str | Path, suffixes: tuple[str, ...]) -> bool:
    return str(path).lower().endswith(suffixes)


def list_dicom_series(folder: str | Path) -> dict[str, int]:
    """Series instance UIDs in ``folder`` with their number of files (read by GDCM, headers only)."""
    import SimpleITK as sitk

    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ()
    return {uid: len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids}


class SlabNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader``, reading the voxels slab by slab into one C-ordered array.

    MONAI's reader returns nibabel's Fortran-ordered array (or memory map), which ``LoadImage``
    then copies to C order: two copies of the image at once, 2 GB for a 1 GB scan. Here the
    C-ordered array is the only full-size one (``LoadImage`` shares it), filled from contiguous
    runs of the last axis, so a scan costs its own size. Values (scaling included), dtype and
    metadata are MONAI's.
    """

    slab_bytes = 64 * 2**20

    def __init__(self) -> None:
        # keep the file open between slabs: a .nii.gz is then decompressed once, front to back
        super().__init__(mmap=False, keep_file_open=True)

    def _get_array_data(self, img: Any, filename: Any) -> np.ndarray:
        proxy, shape = img.dataobj, tuple(img.shape)
        if len(shape) < 2 or not isinstance(proxy, ArrayProxy) or shape[-1] < 2:
            return super()._get_array_data(img, filename)  # type: ignore[no-any-return]
        plane_bytes = math.prod(shape[:-1]) * np.dtype(proxy.dtype).itemsize
        step = max(1, self.slab_bytes // max(plane_bytes, 1))
        first = np.asanyarray(proxy[..., :step])
        out = np.empty(shape, dtype=first.dtype)
        out[..., :step] = first
        del first
        for start in range(step, shape[-1], step):
            out[..., start : start + step] = proxy[..., start : start + step]
        return out


def choose_reader(path: Path, series: str | None = None) -> ImageReader:
    """The MONAI reader for ``path``; a DICOM folder with several series needs ``series``."""
    if path.is_dir():
        found = list_dicom_series(path)
        if not found:
            raise InputError(path, "folder holds no DICOM series")
        if series is None and len(found) > 1:
            listing = ", ".join(f"{uid} ({n} files)" for uid, n in found.items())
            raise InputError(path, f"folder holds {len(found)} DICOM series; pick one with --series UID: {listing}")
        if series is not None and series not in found:
            raise InputError(path, f"no DICOM series {series}; found: {', '.join(found)}")
        uid = series or next(iter(found))
        # ITK (GDCM) sorts the slices by their position along the normal, not by file name,
        # and decodes JPEG 2000 transfer syntaxes.
        return ITKReader(series_name=uid)
    if has_suffix(path, NIFTI_SUFFIXES):
        return SlabNibabelReader()
    if has_suffix(path, ITK_SUFFIXES):
        return ITKReader()
    if has_suffix(path, IMAGE_2D_SUFFIXES):
        return PILReader()
    raise InputError(path, f"unsupported file type; expected one of {', '.join(SUPPORTED)} or a DICOM folder")


def root_cause(exc: BaseException) -> str:
    """One line for an exception from a reader: MONAI wraps the reader's error, traceback text included,
    so take the first ``SomeError: message`` line, without the error's module path."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_.]+(Error|Exception): ", line)]
    text = causes[0] if causes else f"{type(exc).__name__}: {lines[0] if lines else ''}"
    name, _, message = text.partition(": ")
    return f"{name.rsplit('.', 1)[-1]}: {message}"


def load_image(
    paths: str | Path | Sequence[str | Path],
    spatial_dims: int | tuple[int, ...] | None = None,
    series: str | None = None,
    channels_in_file: int = 1,
) -> MetaTensor:
    """Read one image (one file per channel) as a channel-first ``MetaTensor`` ``(C, *S)``.

    ``channels_in_file > 1``: a single file whose last axis holds that many channels (the Medical
    Segmentation Decathlon's 4D images) is read as those channels.

    Raises ``InputError`` naming the file for a missing or unreadable file and for an image whose
    dimensionality is not ``spatial_dims``.
    """
    files = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    if channels_in_file > 1 and len(files) == 1:
        return _load_channels_in_file(files[0], spatial_dims, channels_in_file)
    channels = []
    for path in files:
        img = _read(path, series)
        img = _squeeze_to(img, path, spatial_dims)
        channels.append(img)
    first = channels[0]
    for path, img in zip(files[1:], channels[1:], strict=True):
        if img.shape != first.shape or not np.allclose(img.affine, first.affine, atol=1e-3):
            raise InputError(
                path, f"channel geometry {tuple(img.shape)} does not match {files[0]} {tuple(first.shape)}"
            )
    tensors = [c.as_tensor() for c in channels]
    data = (tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)).float()  # one channel: no copy
    out = MetaTensor(data, affine=first.affine, meta=dict(first.meta))
    out.meta["filename_or_obj"] = str(files[0])
    return out


def _read(path: Path, series: str | None = None) -> MetaTensor:
    if not path.exists():
        raise InputError(path, "no such file or folder")
    reader = choose_reader(path, series)
    try:
        img = LoadImage(reader=reader, image_only=True, ensure_channel_first=False)(str(path))
    except InputError:
        raise
    except Exception as exc:  # readers raise many types; the user needs the file and the reason
        raise InputError(path, f"cannot be read as an image ({root_cause(exc)})") from None
    return img


def _load_channels_in_file(path: Path, spatial_dims: int | tuple[int, ...] | None, count: int) -> MetaTensor:
    img = _read(path)
    dims = max((spatial_dims,) if isinstance(spatial_dims, int) else (spatial_dims or (img.ndim - 1,)))
    if img.ndim != dims + 1 or img.shape[-1] != count:
        raise InputError(
            path, f"expected {count} channels on the last axis of a {dims + 1}D image, got {tuple(img.shape)}"
        )
    data = torch.movedim(img.as_tensor(), -1, 0).float().contiguous()
    out = MetaTensor(data, affine=img.affine, meta=dict(img.meta))
    out.meta["filename_or_obj"] = str(path)
    return out


def _squeeze_to(img: MetaTensor, path: Path, spatial_dims: int | tuple[int, ...] | None) -> MetaTensor:
    """Drop trailing singleton axes (a 2D NIfTI stored as X×Y×1) and check the dimensionality."""
    if spatial_dims is None:
        return img
    allowed = (spatial_dims,) if isinstance(spatial_dims, int) else spatial_dims
    shape = tuple(img.shape)
    while img.ndim > max(allowed) and img.shape[-1] == 1:
        img = img[..., 0]  # type: ignore[assignment]
    if img.ndim == 3 and allowed == (2,) and img.shape[-1] in (3, 4):
        raise InputError(path, f"colour image {shape}; convert it to one grey channel")
    if img.ndim not in allowed:
        want = " or ".join(f"{d}D" for d in allowed)
        raise InputError(path, f"expected a {want} image, got {img.ndim}D with shape {shape}")
    return img
