"""Manifests: CSV files with one row per case.

Columns: ``image`` (one path, or several separated by ``;`` for several channels), ``label``
(optional for inference), ``patient_id``, and optionally ``split`` and ``slice`` (an index along
the last axis, for a 2D view of 3D volumes). Relative paths are relative to the manifest's folder.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from medunet.errors import InputError

REQUIRED = ("image", "patient_id")


@dataclass(frozen=True)
class Case:
    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    patient_id: str
    split: str | None = None
    slice_index: int | None = None

    @property
    def volume_id(self) -> str:
        """The scan a case comes from: slices of one volume share it."""
        return _case_id(self.images[0], None) if self.slice_index is not None else self.case_id

    def as_item(self) -> dict[str, object]:
        """The dictionary a MONAI dataset consumes."""
        item: dict[str, object] = {
            "image": [str(p) for p in self.images],
            "case_id": self.case_id,
            "volume_id": self.volume_id,
        }
        if self.label is not None:
            item["label"] = str(self.label)
        if self.slice_index is not None:
            item["slice"] = self.slice_index
        return item


def read_manifest(path: str | Path) -> list[Case]:
    """Read and check a manifest; every referenced file must exist."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such manifest")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(path, f"manifest lacks column(s) {missing}; has {reader.fieldnames}")
        rows = list(reader)
    if not rows:
        raise InputError(path, "manifest has no rows")
    root = path.parent
    cases = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        images = tuple(_resolve(root, p) for p in row["image"].split(";") if p.strip())
        label = _resolve(root, row["label"]) if row.get("label") else None
        for f in (*images, *([label] if label else [])):
            if not f.exists():
                raise InputError(path, f"line {line}: {f} does not exist")
        if not row["patient_id"].strip():
            raise InputError(path, f"line {line}: empty patient_id")
        slice_index = int(row["slice"]) if row.get("slice") not in (None, "") else None
        case_id = row.get("case_id") or _case_id(images[0], slice_index)
        if case_id in seen:
            raise InputError(path, f"line {line}: duplicate case {case_id}")
        seen.add(case_id)
        cases.append(Case(case_id, images, label, row["patient_id"].strip(), row.get("split") or None, slice_index))
    return cases


def _resolve(root: Path, p: str) -> Path:
    q = Path(p.strip())
    return q if q.is_absolute() else (root / q).resolve()


def _case_id(image: Path, slice_index: int | None) -> str:
    name = image.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".tif", ".tiff"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name if slice_index is None else f"{name}_z{slice_index:03d}"
