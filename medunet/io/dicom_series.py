"""Finding, choosing and checking the DICOM series in a folder, from the files' headers (pydicom).

A folder is read as one volume only when its slices make one: every slice readable to its last
pixel byte, with a position, one orientation, one size, and positions spaced evenly along the slice
normal. Anything else is refused with what is wrong and where (which positions are missing), because
ITK would read it anyway onto a stretched grid. ``accept_damaged`` reads the readable slices regardless.

Series are numbered in a stable order (UID, then first file name), so ``--series 2`` chooses one
even where a series has no SeriesInstanceUID. Nothing from the patient module is read into messages.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from collections.abc import Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from medunet.errors import InputError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# Positions along the slice normal closer than this share a slice (mm); steps that differ from the
# series' median step by more than STEP_TOLERANCE of it plus STEP_SLACK_MM are uneven (the slack lets
# positions rounded to 0.1 mm pass).
SAME_POSITION_MM = 1e-3
STEP_TOLERANCE = 0.05
STEP_SLACK_MM = 0.05
ORIENTATION_TOLERANCE = 1e-4
DEFLATED = "1.2.840.10008.1.2.1.99"
ITEM_TAG = 0xFFFEE000
SEQUENCE_DELIMITER = 0xFFFEE0DD


@dataclass(frozen=True)
class Slice:
    path: Path
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    size: tuple[int, int]
    spacing: tuple[float, ...] | None
    frames: int


@dataclass
class Series:
    """The image files of one SeriesInstanceUID ('' where the files have none)."""

    uid: str
    modality: str
    slices: list[Slice] = field(default_factory=list)
    number: int = 0

    @property
    def files(self) -> list[Path]:
        return [s.path for s in self.slices]

    def describe(self) -> str:
        uid = self.uid or "no SeriesInstanceUID"
        return f"{self.number}: {uid} ({self.modality or 'no modality'}, {len(self.slices)} files)"


@dataclass
class Folder:
    series: list[Series]
    damaged: list[tuple[Path, str]]  # (file, what is wrong), files that look like DICOM images but cannot be read
    damaged_series: dict[Path, str] = field(default_factory=dict)  # a damaged file's SeriesInstanceUID, if read


def scan_folder(folder: Path) -> Folder:
    """Read the headers of every file in ``folder`` (not its sub-folders); group the images by series.

    Files that are not DICOM, and DICOM objects without pixels (reports, presentation states), are
    passed over; DICOM image files that end early or lack their pixels are listed as damaged.
    """
    by_uid: dict[str, Series] = {}
    damaged: list[tuple[Path, str]] = []
    damaged_series: dict[Path, str] = {}
    try:
        paths = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as exc:
        raise InputError(folder, f"cannot list the folder ({exc.strerror or exc})") from None
    for path in paths:
        try:
            ds, problem = _read_header(path)
        except OSError as exc:
            damaged.append((path, f"cannot be opened: {exc.strerror or exc}"))
            continue
        except Exception as exc:  # a header that pydicom cannot parse
            if _has_dicom_preamble(path):
                damaged.append((path, f"unreadable header ({type(exc).__name__})"))
            continue
        if ds is None or not _is_image(ds):
            continue  # not DICOM, or a DICOM object without pixels
        if problem is not None:
            damaged.append((path, problem))
            if ds.get("SeriesInstanceUID"):
                damaged_series[path] = str(ds.get("SeriesInstanceUID"))
            continue
        uid = str(ds.get("SeriesInstanceUID") or "")
        series = by_uid.setdefault(uid, Series(uid, str(ds.get("Modality") or "")))
        series.slices.append(_slice(path, ds))
    ordered = sorted(by_uid.values(), key=lambda s: (s.uid, s.slices[0].path.name))
    for number, series in enumerate(ordered, start=1):
        series.number = number
        series.slices.sort(key=_along_normal)
    return Folder(ordered, damaged, damaged_series)


def _read_header(path: Path) -> tuple[Dataset | None, str | None]:
    """The header of a DICOM file (``None`` for another kind of file) and what is wrong with its pixels.

    Files without the 128-byte preamble (older DICOM) are read as well, where they hold an image.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    with open(path, "rb") as fp:
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
        except InvalidDicomError:
            fp.seek(0)
            try:
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
            except Exception:
                return None, None
            if "SOPClassUID" not in ds or "Rows" not in ds:
                return None, None
        return ds, _pixel_problem(fp, ds, path.stat().st_size)


def _along_normal(s: Slice) -> tuple[float, str]:
    """Position along the slice normal (ITK's order), then the file name."""
    if s.position is None or s.orientation is None:
        return (math.inf, s.path.name)
    normal = np.cross(s.orientation[:3], s.orientation[3:])
    return (float(np.dot(normal, s.position)), s.path.name)


def volume_slices(series: Series) -> tuple[list[Path], str]:
    """The slices of a damaged series that can stack into one volume (with a position, and of the
    most common size and orientation), and a note of what was left out."""
    placed = [s for s in series.slices if s.position is not None and s.orientation is not None]
    if not placed:
        return series.files, ""
    kinds = Counter((s.size, tuple(round(v, 4) for v in s.orientation or ())) for s in placed)
    common = kinds.most_common(1)[0][0]
    kept = [s for s in placed if (s.size, tuple(round(v, 4) for v in s.orientation or ())) == common]
    left = len(series.slices) - len(kept)
    return [s.path for s in kept], (f"{_count(range(left), 'slice')} of another size or orientation, or without "
                                    "position, left out" if left else "")  # fmt: skip


def choose_series(folder: Path, found: Folder, series: str | None) -> Series:
    """The series ``series`` names (its number in the listing, or its UID); the only one when ``None``."""
    listing = "; ".join(s.describe() for s in found.series)
    if not found.series:
        if found.damaged:
            path, problem = found.damaged[0]
            raise InputError(folder, f"no readable DICOM image; {path.name}: {problem}")
        raise InputError(folder, "folder holds no DICOM image series")
    if series is None:
        if len(found.series) > 1:
            raise InputError(
                folder, f"folder holds {len(found.series)} DICOM series; pick one with --series NUMBER: {listing}"
            )
        return found.series[0]
    if series.isdigit() and 1 <= int(series) <= len(found.series):
        return found.series[int(series) - 1]
    for candidate in found.series:
        if candidate.uid and candidate.uid == series:
            return candidate
    raise InputError(folder, f"no DICOM series {series}; choose by number: {listing}")


def series_problems(series: Series, damaged: Sequence[tuple[Path, str]] = ()) -> list[str]:
    """What keeps ``series`` from being one evenly spaced volume, one phrase per problem (none: it is)."""
    problems = [f"{path.name} cannot be read ({why})" for path, why in damaged]
    slices = series.slices
    if len(slices) == 1 or any(s.frames > 1 for s in slices):
        return problems  # one slice, or a multi-frame object: its geometry is its own
    sizes = sorted({s.size for s in slices})
    if len(sizes) > 1:
        problems.append("slices differ in size (" + ", ".join(f"{r}x{c}" for r, c in sizes) + ")")
    no_position = [s.path.name for s in slices if s.position is None or s.orientation is None]
    if no_position:
        problems.append(f"{_count(no_position, 'slice')} without ImagePositionPatient/ImageOrientationPatient")
        return problems
    orientations = np.array([s.orientation for s in slices], dtype=np.float64)
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        problems.append(f"slices differ in orientation ({len(np.unique(orientations.round(4), axis=0))} orientations)")
        return problems
    spacings = {s.spacing for s in slices}
    if len(spacings) > 1:
        problems.append("slices differ in pixel spacing")
    row, col = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, col)
    along = np.sort(np.array([np.dot(normal, s.position) for s in slices], dtype=np.float64))  # type: ignore[arg-type]
    steps = np.diff(along)
    duplicated = along[1:][steps < SAME_POSITION_MM]
    if duplicated.size:
        where = ", ".join(f"{p:g}" for p in np.unique(duplicated.round(3))[:5])
        problems.append(f"{_count(duplicated, 'slice')} repeat a position (at {where} mm along the normal)")
        return problems
    problems += _spacing_problems(along, steps, bool(damaged))
    return problems


def _spacing_problems(along: np.ndarray, steps: np.ndarray, gap_expected: bool) -> list[str]:
    if steps.size == 0:
        return []
    step = float(np.median(steps))
    tolerance = STEP_TOLERANCE * step + STEP_SLACK_MM
    if float(np.abs(steps - step).max()) <= tolerance:
        return []
    missing: list[float] = []
    uneven = False
    for start, gap in zip(along[:-1], steps, strict=True):
        k = round(gap / step)
        if abs(gap - step) <= tolerance:
            continue
        if k >= 2 and abs(gap - k * step) <= tolerance * k:
            missing += [float(start + i * step) for i in range(1, k)]
        else:
            uneven = True
    problems = []
    if missing:
        where = ", ".join(f"{p:g}" for p in missing[:8]) + (", ..." if len(missing) > 8 else "")
        problems.append(f"{_count(missing, 'slice')} missing at {where} mm along the normal (step {step:g} mm)")
    if uneven or (not missing and not gap_expected):
        problems.append(f"uneven slice spacing ({float(steps.min()):g} to {float(steps.max()):g} mm)")
    return problems


def _count(items: Sized, noun: str) -> str:
    n = len(items)
    return f"{n} {noun}{'' if n == 1 else 's'}"


def check_series(folder: Path, series: Series, found: Folder, accept_damaged: bool) -> list[str]:
    """Refuse (``InputError``) a series that is not one evenly spaced volume, unless ``accept_damaged``;
    then the problems are returned for a warning. Damaged files that name no series count against it."""
    damaged = [(p, why) for p, why in found.damaged if found.damaged_series.get(p) in (series.uid, None)]
    problems = series_problems(series, damaged)
    if problems and not accept_damaged:
        raise InputError(
            folder,
            f"DICOM series {series.describe()}: " + "; ".join(problems) + "; refused (--accept-damaged-series reads "
            "the readable slices anyway)",
        )
    return problems


def _slice(path: Path, ds: Dataset) -> Slice:
    get = ds.get

    def floats(name: str, n: int) -> tuple[float, ...] | None:
        value = get(name)
        try:
            out = tuple(float(v) for v in value) if value is not None else None
        except (TypeError, ValueError):
            return None
        return out if out is not None and len(out) == n and all(math.isfinite(v) for v in out) else None

    return Slice(
        path=path,
        position=floats("ImagePositionPatient", 3),
        orientation=floats("ImageOrientationPatient", 6),
        size=(int(get("Rows") or 0), int(get("Columns") or 0)),
        spacing=floats("PixelSpacing", 2),
        frames=int(get("NumberOfFrames") or 1),
    )


def _is_image(ds: Dataset) -> bool:
    if "Rows" in ds and "Columns" in ds:
        return True
    meta = getattr(ds, "file_meta", None)
    sop = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return sop is not None and "Image Storage" in getattr(sop, "name", "")


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as fp:
        fp.seek(128)
        return fp.read(4) == b"DICM"


def _pixel_problem(f: BinaryIO, ds: Dataset, file_size: int) -> str | None:
    """Whether the pixel data that follows the header (``f`` stands at its tag) is complete."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or syntax == DEFLATED:
        return None  # no stated syntax, or a deflated stream (pydicom inflated it): ITK decides
    start = f.tell()
    if start >= file_size:
        return f"the file ends at {file_size} bytes, before its pixel data"
    little = syntax.is_little_endian
    implicit = syntax.is_implicit_VR
    endian = "<" if little else ">"
    head = f.read(8)
    if len(head) < 8:
        return "the file ends inside its pixel data"
    group, element = struct.unpack(endian + "HH", head[:4])
    if (group, element) != (0x7FE0, 0x0010):
        return None  # something else follows the header (no pixels, or a float pixel element): ITK decides
    if implicit:
        (length,) = struct.unpack(endian + "I", head[4:8])
        value_at = start + 8
    else:
        vr = head[4:6]
        if vr in (b"OB", b"OW", b"OF", b"UN", b"OD", b"OL", b"OV"):
            more = f.read(4)
            if len(more) < 4:
                return "the file ends inside its pixel data"
            (length,) = struct.unpack(endian + "I", more)
            value_at = start + 12
        else:
            (length,) = struct.unpack(endian + "H", head[6:8])
            value_at = start + 8
    if length != 0xFFFFFFFF:
        return None if value_at + length <= file_size else _short(file_size, value_at + length)
    # encapsulated (compressed) frames: items up to the sequence delimiter, all inside the file
    at = value_at
    while True:
        f.seek(at)
        item = f.read(8)
        if len(item) < 8:
            return _short(file_size, at + 8)
        tag_group, tag_element, item_length = struct.unpack(endian + "HHI", item)
        tag = (tag_group << 16) | tag_element
        if tag == SEQUENCE_DELIMITER:
            return None
        if tag != ITEM_TAG:
            return "its compressed pixel data is malformed"
        at += 8 + item_length
        if at > file_size:
            return _short(file_size, at)


def _short(size: int, needed: int) -> str:
    return f"truncated: {size} bytes, its pixel data needs {needed}"
