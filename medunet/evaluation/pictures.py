"""Pictures a person checks: training curves, and masks over scans (QC)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medunet.io.writers import atomic_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curve(history: Sequence[dict[str, Any]], path: Path) -> Path:
    """Loss and validation Dice per class against the epoch, as a PNG."""
    plt = _pyplot()
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss (DiceCE)", title="loss")
    for key in sorted({k for h in history for k in h if k.startswith("dice_")}):
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        ax_dice.plot(*zip(*pts, strict=True), marker="o", label=key.removeprefix("dice_"))
    ax_dice.set(xlabel="epoch", ylabel="validation Dice", title="validation Dice", ylim=(0, 1))
    ax_dice.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def qc_picture(
    image: np.ndarray,
    labels: np.ndarray,
    label_names: Sequence[str],
    path: Path,
    title: str = "",
    spacing: Sequence[float] = (),
) -> Path:
    """Mask over scan: three orthogonal planes through the labelled structure (one plane for 2D).

    ``image`` is ``(*S)`` (first channel), ``labels`` ``(*S)`` class indices; the legend names the classes.
    With ``spacing`` (mm per voxel along each axis) each plane is drawn to scale.
    """
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = plt.get_cmap("tab10").colors
    cmap = ListedColormap([(0, 0, 0, 0)] + [(*colours[i % 10], 0.45) for i in range(max(len(label_names) - 1, 1))])
    fg = np.argwhere(labels > 0)
    centre = fg.mean(0).round().astype(int) if len(fg) else np.array(labels.shape) // 2
    mm = list(spacing) if len(spacing) == labels.ndim else [1.0] * labels.ndim
    if labels.ndim == 2:
        planes = [("", image, labels, mm[1] / mm[0])]
    else:
        planes = [
            ("sagittal", image[centre[0]], labels[centre[0]], mm[2] / mm[1]),
            ("coronal", image[:, centre[1]], labels[:, centre[1]], mm[2] / mm[0]),
            ("axial", image[:, :, centre[2]], labels[:, :, centre[2]], mm[1] / mm[0]),
        ]
    fig, axes = plt.subplots(1, len(planes), figsize=(4 * len(planes), 4.4), squeeze=False)
    lo, hi = np.percentile(image, [1, 99])
    for ax, (name, img, lab, aspect) in zip(axes[0], planes, strict=True):
        ax.imshow(img.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect)
        ax.imshow(
            lab.T, cmap=cmap, origin="lower", vmin=0, vmax=len(label_names) - 1, interpolation="nearest", aspect=aspect
        )
        ax.set_title(name)
        ax.axis("off")
    handles = [Patch(color=colours[(i - 1) % 10], label=n) for i, n in enumerate(label_names) if i > 0]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles))
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
