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

from medunet import runtime
from medunet.errors import InputError
from medunet.io.dicom_series import check_series, choose_series, scan_folder, volume_slices

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
IMAGE_2D_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
SUPPORTED = NIFTI_SUFFIXES + ITK_SUFFIXES + IMAGE_2D_SUFFIXES


def has_suffix(path: str | Path, suffixes: tuple[str, ...]) -> bool:
    return str(path).lower().endswith(suffixes)


def list_dicom_series(folder: str | Path) -> dict[str, int]:
    """Series in ``folder`` as ``"N: UID (modality, K files)"`` -> K, numbered as ``--series N`` chooses them."""
    return {s.describe(): len(s.slices) for s in scan_folder(Path(folder)).series}


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

    def read(self, data: Any, **kwargs: Any) -> Any:
        """nibabel's image as the file states it. MONAI would "correct" a header whose pixdim disagrees
        with its sform or qform by replacing one with the other, and so write the mask on another
        grid than every viewer shows the scan on; nibabel's affine follows the NIfTI standard."""
        import nibabel as nib

        self.filenames = tuple(str(name) for name in ([data] if isinstance(data, str | Path) else data))
        images = [nib.load(name, **{**self.kwargs, **kwargs}) for name in self.filenames]
        return images if len(images) > 1 else images[0]

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


def choose_reader(path: Path) -> ImageReader:
    """The MONAI reader for the image file ``path`` (DICOM folders: ``_read_series``)."""
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
    itk = [line.split("):", 1)[1].strip() for line in lines if line.startswith("ITK ERROR:") and "):" in line]
    if itk:  # ITK's own reason, not the C++ file and line it was raised at
        return f"ITK: {itk[0]}"
    causes = [line for line in lines if re.match(r"^[A-Za-z_.]+(Error|Exception): ", line)]
    text = causes[0] if causes else f"{type(exc).__name__}: {lines[0] if lines else ''}"
    name, _, message = text.partition(": ")
    return f"{name.rsplit('.', 1)[-1]}: {message}"


def load_image(
    paths: str | Path | Sequence[str | Path],
    spatial_dims: int | tuple[int, ...] | None = None,
    series: str | None = None,
    channels_in_file: int = 1,
    accept_damaged: bool = False,
) -> MetaTensor:
    """Read one image (one file per channel) as a channel-first ``MetaTensor`` ``(C, *S)``.

    ``channels_in_file > 1``: a single file whose last axis holds that many channels (the Medical
    Segmentation Decathlon's 4D images) is read as those channels.

    ``series``: which DICOM series of a folder (its number in the listing, or its UID);
    ``accept_damaged``: read a series with missing, uneven or damaged slices instead of refusing it.

    Raises ``InputError`` naming the file for a missing or unreadable file and for an image whose
    dimensionality is not ``spatial_dims``.
    """
    files = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    if channels_in_file > 1 and len(files) == 1:
        return _load_channels_in_file(files[0], spatial_dims, channels_in_file)
    channels = []
    for path in files:
        img = _read(path, series, accept_damaged)
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
    out = MetaTensor(data, affine=first.affine, meta=meta_without_affine(first.meta))
    out.meta["filename_or_obj"] = str(files[0])
    return out


def _read(path: Path, series: str | None = None, accept_damaged: bool = False) -> MetaTensor:
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        return _read_series(path, series, accept_damaged)
    check_claimed_size(path)
    return _check_grid(_load(path, choose_reader(path)), path)


def _check_grid(img: MetaTensor, path: Path) -> MetaTensor:
    """Refuse an image whose header places it nowhere: an affine with NaN or infinity, or a singular one."""
    affine = np.asarray(img.affine, dtype=np.float64)
    dims = affine.shape[0] - 1
    axes = affine[:dims, :dims]
    sizes = np.linalg.norm(axes, axis=0) if np.isfinite(affine).all() else np.zeros(dims)
    # a degenerate grid: an axis of no length, or two axes (nearly) along one direction; tiny voxels
    # (micrometres in mm, or in metres) are fine
    if not (sizes > 0).all() or abs(float(np.linalg.det(axes))) < 1e-6 * float(np.prod(sizes)):
        raise InputError(
            path, "header gives no usable voxel grid (its sform/qform or voxel size is NaN, zero or infinite)"
        )
    if any(s < 1 for s in img.shape):
        raise InputError(path, f"image has an empty axis {tuple(img.shape)}")
    return img


def _load(path: Path, reader: ImageReader, name: Path | None = None) -> MetaTensor:
    """``reader`` alone reads ``path``: MONAI's fallback to every other reader (and its log line per
    reader) would only bury the one reason, or read a PNG named ``.nii.gz``."""
    if isinstance(reader, ITKReader):
        runtime.before_itk_read()
    try:
        img = LoadImage(reader=reader, image_only=True, ensure_channel_first=False)(str(path), reader=reader)
    except InputError:
        raise
    except Exception as exc:  # readers raise many types; the user needs the file and the reason
        raise InputError(name or path, f"cannot be read as an image ({root_cause(exc)})") from None
    return img  # type: ignore[no-any-return]


class SeriesReader(ITKReader):
    """MONAI's ``ITKReader`` reading exactly the given slice files, in the given order, as one volume.

    Given a folder, ITK (GDCM) would split one series by its details (series number, slice
    thickness, size, date) and read only the first part; the files here are the series that
    ``dicom_series`` chose and checked, ordered along the slice normal.
    """

    def __init__(self, files: Sequence[Path]) -> None:
        super().__init__()
        self.files = [str(f) for f in files]

    def read(self, data: Any, **kwargs: Any) -> Any:
        import itk

        return itk.imread(self.files[0] if len(self.files) == 1 else self.files, **{**self.kwargs, **kwargs})


def _read_series(folder: Path, series: str | None, accept_damaged: bool) -> MetaTensor:
    """Check the chosen series (see ``dicom_series``) and read exactly its slices with ITK (GDCM,
    which decodes JPEG 2000)."""
    found = scan_folder(folder)
    chosen = choose_series(folder, found, series)
    problems = check_series(folder, chosen, found, accept_damaged)
    files = chosen.files
    if problems:
        files, dropped = volume_slices(chosen)
        note = f"; {dropped}" if dropped else ""
        log.warning(
            "%s: reading DICOM series %d as asked, despite: %s%s", folder, chosen.number, "; ".join(problems), note
        )
    img = _load(folder, SeriesReader(files), name=folder)
    img.meta["filename_or_obj"] = str(folder)
    return _check_grid(img, folder)


def check_claimed_size(path: Path) -> None:
    """Refuse a NIfTI whose header claims more voxel bytes than the file can hold, before allocating them.

    Uncompressed: the file must reach the header's offset plus the voxels. gzip: deflate packs at most
    1032 bytes into one, so a claim beyond 1032 times the file is impossible.
    """
    if not has_suffix(path, NIFTI_SUFFIXES):
        return
    import nibabel as nib

    try:
        header: Any = nib.load(str(path)).header
        shape = tuple(int(v) for v in header.get_data_shape())
        itemsize = np.dtype(header.get_data_dtype()).itemsize
        offset = int(header.get_data_offset())
    except Exception:
        return  # not readable as NIfTI: the reader says why
    if any(s < 0 for s in shape):
        raise InputError(path, f"header gives a negative dimension {shape}")
    claimed = math.prod(shape) * itemsize
    size = path.stat().st_size
    compressed = has_suffix(path, (".gz",))
    if (compressed and claimed > MAX_DEFLATE_RATIO * size) or (not compressed and offset + claimed > size):
        raise InputError(
            path,
            f"header claims {shape} voxels ({_bytes(claimed)}), more than the {_bytes(size)} file can hold; "
            "the header or the file is damaged",
        )


MAX_DEFLATE_RATIO = 1032


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _load_channels_in_file(path: Path, spatial_dims: int | tuple[int, ...] | None, count: int) -> MetaTensor:
    img = _read(path)
    dims = max((spatial_dims,) if isinstance(spatial_dims, int) else (spatial_dims or (img.ndim - 1,)))
    if img.ndim != dims + 1 or img.shape[-1] != count:
        raise InputError(
            path, f"expected {count} channels on the last axis of a {dims + 1}D image, got {tuple(img.shape)}"
        )
    data = torch.movedim(img.as_tensor(), -1, 0).float().contiguous()
    out = MetaTensor(data, affine=img.affine, meta=meta_without_affine(img.meta))
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


def meta_without_affine(meta: dict[str, Any]) -> dict[str, Any]:
    """A MetaTensor's meta for a new tensor given its affine separately (MONAI warns when both carry one)."""
    return {k: v for k, v in meta.items() if k != "affine"}
