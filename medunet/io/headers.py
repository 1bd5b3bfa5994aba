"""Reading only the headers of images (shape and world affine), to check a data set before loading it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medunet.errors import InputError
from medunet.io.readers import IMAGE_2D_SUFFIXES, NIFTI_SUFFIXES, has_suffix

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Header:
    shape: tuple[int, ...]
    affine: np.ndarray | None  # RAS, 4x4; None where the format has no geometry (PNG)


def read_header(path: Path) -> Header:
    """Shape and affine of an image file without reading its voxels (a DICOM folder: ``None`` affine)."""
    if not path.exists():
        raise InputError(path, "no such file or folder")
    try:
        if path.is_dir():
            return Header((), None)
        if has_suffix(path, NIFTI_SUFFIXES):
            import nibabel as nib

            img: Any = nib.load(str(path))
            return Header(tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64))
        if has_suffix(path, IMAGE_2D_SUFFIXES):
            from PIL import Image

            with Image.open(path) as im:
                return Header(im.size, None)
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        dims = reader.GetDimension()
        space = min(dims, 3)  # a 4D file's last axis holds channels or time points: no world geometry
        direction = np.asarray(reader.GetDirection()).reshape(dims, dims)[:space, :space]
        affine = np.eye(4)
        affine[:space, :space] = direction * np.asarray(reader.GetSpacing())[:space]
        affine[:space, 3] = reader.GetOrigin()[:space]
        return Header(tuple(int(s) for s in reader.GetSize()), LPS_TO_RAS @ affine)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            path, f"cannot be read as an image ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None


def check_same_grid(label: str | Path, image_grid: Header, label_grid: Header) -> None:
    """Refuse a label whose grid (shape, and affine where both have one) differs from its image's."""
    if label_grid.shape != image_grid.shape:
        raise InputError(label, f"label shape {label_grid.shape} does not match image shape {image_grid.shape}")
    a, b = image_grid.affine, label_grid.affine
    if a is not None and b is not None and not np.allclose(a, b, atol=1e-3):
        raise InputError(label, "label geometry (spacing/origin/direction) does not match its image")


def check_pair(image: Path, label: Path, channels_in_file: int = 1) -> None:
    """``check_same_grid`` from the files' headers alone. ``channels_in_file > 1``: the image may hold
    that many channels on a last axis of its own (the Decathlon's 4D images), which the label lacks."""
    a, b = read_header(image), read_header(label)
    if channels_in_file > 1 and len(a.shape) == len(b.shape) + 1 and a.shape[-1] == channels_in_file:
        a = Header(a.shape[:-1], a.affine)
    if a.shape and b.shape:  # DICOM folders are checked when loaded
        check_same_grid(label, a, b)
