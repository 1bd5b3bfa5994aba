"""Large test volumes assembled from real MSD hippocampus cases (``../shared/data/msd_hippocampus``).

Each case is z-scored and placed in its own 40x56x40 box of a regular grid (zero between boxes), so
a grid of 6x4x4 boxes gives a 240x224x160 volume (8.6 M voxels) whose every box holds a real MRI
crop and its real label. Cases come from the shipped model's validation side where possible.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TILE = (40, 56, 40)


def case_ids(data: Path = DATA) -> list[str]:
    """Validation cases of the default model first, then the rest of the folder."""
    split = REPO / "bundles" / "hippocampus_mri_3d" / "configs" / "split.json"
    val = json.loads(split.read_text())["val"] if split.exists() else []
    names = sorted(p.name.removesuffix(".nii.gz") for p in (data / "msd_hippocampus" / "images").glob("*.nii.gz"))
    if not names:
        raise SystemExit(f"no hippocampus images under {data / 'msd_hippocampus'}")
    return [n for n in val if n in names] + [n for n in names if n not in val]


def _place(box: np.ndarray, arr: np.ndarray, fill: str = "constant") -> None:
    """Centre ``arr`` in ``box`` (cropping it where larger, padding it with ``fill`` where smaller)."""
    sizes = zip(arr.shape, box.shape, strict=True)
    pads = [((b - a) // 2, b - a - (b - a) // 2) if a < b else (0, 0) for a, b in sizes]
    arr = np.pad(arr, pads, mode=fill)
    src, dst = [], []
    for a, b in zip(arr.shape, box.shape, strict=True):
        if a <= b:
            off = (b - a) // 2
            src.append(slice(0, a))
            dst.append(slice(off, off + a))
        else:
            off = (a - b) // 2
            src.append(slice(off, off + b))
            dst.append(slice(0, b))
    box[tuple(dst)] = arr[tuple(src)]


def tiled_volume(grid: tuple[int, int, int], shape: tuple[int, ...] | None = None, data: Path = DATA):
    """``(image float32, label uint8, affine)`` of ``grid`` boxes, optionally padded to ``shape``.

    The affine is RAS at 1 mm, like the source crops.
    """
    ids = case_ids(data)
    full = tuple(g * t for g, t in zip(grid, TILE, strict=True))
    shape = shape or full
    image = np.zeros(shape, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    k = 0
    for i in range(grid[0]):
        for j in range(grid[1]):
            for m in range(grid[2]):
                name = ids[k % len(ids)]
                k += 1
                img = nib.as_closest_canonical(nib.load(data / "msd_hippocampus" / "images" / f"{name}.nii.gz"))
                lab = nib.as_closest_canonical(nib.load(data / "msd_hippocampus" / "labels" / f"{name}.nii.gz"))
                a = np.asarray(img.dataobj, dtype=np.float32)
                a = (a - a.mean()) / max(float(a.std()), 1e-6)
                where = tuple(slice(n * t, (n + 1) * t) for n, t in zip((i, j, m), TILE, strict=True))
                _place(image[where], a)
                _place(label[where], np.asarray(lab.dataobj, dtype=np.uint8))
    return image, label, np.eye(4)


def write_tiled(path: Path, grid: tuple[int, int, int], shape: tuple[int, ...] | None = None) -> Path:
    """Write a tiled volume (and ``<name>_label.nii.gz``) as NIfTI."""
    image, label, affine = tiled_volume(grid, shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), path)
    stem = path.name.removesuffix(".gz").removesuffix(".nii")
    nib.save(nib.Nifti1Image(label, affine), path.with_name(f"{stem}_label.nii.gz"))
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", type=Path)
    parser.add_argument("--grid", type=int, nargs=3, default=(6, 4, 4))
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="pad to this shape, e.g. 512 512 600")
    args = parser.parse_args()
    print(write_tiled(args.output, tuple(args.grid), tuple(args.shape) if args.shape else None))
