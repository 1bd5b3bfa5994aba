"""Where the pixel errors of predicted EM membrane masks lie: how many are within 1 or 2 pixels of a
border in the label (membrane against cell interior), where the annotated membrane's width is a
matter of the annotator's hand, and what error is left further away.

    python scripts/em_border_errors.py --pred MASKS --label LABELS

Both folders hold PNG masks of the same names; membrane is the darker value (0), as in the ISBI 2012
labels and in what ``medunet infer`` writes for them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi


def border_distance(membrane: np.ndarray) -> np.ndarray:
    """Distance in pixels from every pixel to the nearest label border (a membrane pixel next to an
    interior one, or the other way round)."""
    border = membrane ^ ndi.binary_erosion(membrane) | ~membrane ^ ndi.binary_erosion(~membrane)
    return ndi.distance_transform_edt(~border)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pred", type=Path, required=True)
    parser.add_argument("--label", type=Path, required=True)
    args = parser.parse_args()
    errors = pixels = 0
    near = {1: 0, 2: 0}
    for label_path in sorted(args.label.glob("*.png")):
        label = np.asarray(Image.open(label_path)) == 0
        pred = np.asarray(Image.open(args.pred / label_path.name)) == 0
        wrong = pred != label
        dist = border_distance(label)
        errors += int(wrong.sum())
        pixels += wrong.size
        for k in near:
            near[k] += int((wrong & (dist <= k)).sum())
        print(f"{label_path.name}: pixel error {wrong.mean():.4f} (false membrane {np.mean(pred & ~label):.4f})")
    print(f"pixel error {errors / pixels:.4f}")
    for k, n in near.items():
        print(f"within {k} px of a label border: {n / errors:.1%} of the errors; the rest: {(errors - n) / pixels:.4f}")


if __name__ == "__main__":
    main()
