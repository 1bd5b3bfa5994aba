"""Regenerate the shipped manifests from ``../shared/data`` (run from the repository root).

Paths are written relative to this folder, as ``read_manifest`` expects.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import nibabel as nib

HERE = Path(__file__).resolve().parent
DATA = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent.parent / "shared" / "data"


def rel(p: Path) -> str:
    return os.path.relpath(p, HERE)


def write(name: str, header: list[str], rows: list[list[object]]) -> None:
    with (HERE / name).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    print(f"{name}: {len(rows)} rows")


def main() -> None:
    hippo = DATA / "msd_hippocampus"
    images = sorted((hippo / "images").glob("*.nii.gz"))
    rows3d, rows2d = [], []
    for img in images:
        lab = hippo / "labels" / img.name
        case = img.name.removesuffix(".nii.gz")
        rows3d.append([rel(img), rel(lab), case])
        depth = nib.load(img).shape[2]
        rows2d += [[rel(img), rel(lab), case, z] for z in range(depth)]
    write("msd_hippocampus_3d.csv", ["image", "label", "patient_id"], rows3d)
    write("msd_hippocampus_2d_slices.csv", ["image", "label", "patient_id", "slice"], rows2d)

    brats = DATA / "brats2015_deepmedic"
    rows = []
    for split in ("train", "validation", "test"):
        for case in sorted((brats / split).iterdir()):
            chans = ";".join(rel(case / f) for f in ("Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"))
            split_name = {"validation": "val"}.get(split, split)
            rows.append([case.name, chans, rel(case / "OTMultiClass.nii.gz"), case.name, split_name])
    write("brats2015_3d.csv", ["case_id", "image", "label", "patient_id", "split"], rows)

    # One specimen; contiguous blocks of 5 sections stand in for patients, so validation
    # sections are never the direct neighbours of training sections.
    isbi = DATA / "isbi2012_membrane" / "train"
    rows = [[rel(isbi / "image" / f"{i}.png"), rel(isbi / "label" / f"{i}.png"), f"block{i // 5}"] for i in range(30)]
    write("isbi2012_membrane_2d.csv", ["image", "label", "patient_id"], rows)


if __name__ == "__main__":
    main()
