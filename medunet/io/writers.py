"""Writing masks with the input's exact geometry, atomically (temporary name, then rename)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from medunet.errors import InputError
from medunet.io.readers import IMAGE_2D_SUFFIXES, NIFTI_SUFFIXES, has_suffix


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it over ``path`` on success.

    On any error the temporary file is removed, so no half-written output is ever left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        try:
            yield tmp
            os.replace(tmp, path)
        except OSError as exc:  # a full disk, say: name the output, not the temporary file
            if exc.strerror is None:
                raise
            raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through ``atomic_path``: readers see the old file or the new, never half."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_array(array: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write ``array`` (``(*S)``, or ``(*S, K)`` for probabilities) with world ``affine`` (RAS).

    NIfTI for 3D and 2D; PNG/TIFF for 2D label maps (values must fit in uint8).
    """
    path = Path(path)
    affine = np.asarray(affine, dtype=np.float64)
    if has_suffix(path, NIFTI_SUFFIXES):
        if affine.shape == (3, 3):  # a 2D affine: embed it in 3D
            a3 = np.eye(4)
            a3[:2, :2], a3[:2, 3] = affine[:2, :2], affine[:2, 2]
            affine = a3
            if array.ndim == 3:  # (X, Y, K) -> (X, Y, 1, K)
                array = array[:, :, None]
        img = nib.Nifti1Image(array, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        with atomic_path(path) as tmp:
            nib.save(img, str(tmp))
        return path
    if has_suffix(path, IMAGE_2D_SUFFIXES):
        from PIL import Image

        if array.ndim != 2:
            raise InputError(path, f"PNG/TIFF output holds a 2D label map, got shape {array.shape}; use .nii.gz")
        # MONAI's PIL reader indexes (x, y); images store rows first.
        with atomic_path(path) as tmp:
            Image.fromarray(np.ascontiguousarray(array.T.astype(np.uint8))).save(tmp, format=_pil_format(path))
        return path
    raise InputError(path, f"unsupported output type; use one of {', '.join(NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES)}")


def _pil_format(path: Path) -> str:
    ext = path.suffix.lower()
    return {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}[ext]
