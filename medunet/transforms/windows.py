"""Sliding-window sizes."""

from __future__ import annotations

from collections.abc import Sequence


def fit_window(roi: Sequence[int], shape: Sequence[int], patch: Sequence[int]) -> tuple[int, ...]:
    """The window for an image: ``roi``, shrunk where the image is smaller, but never below the
    training ``patch``.

    MONAI pads an image smaller than the window with zeros. Up to the training patch that is what the
    network saw in training (volumes are padded to the patch there too); beyond it, a network with
    instance norm sees statistics it never saw, so the window shrinks instead (our networks take any size).
    """
    if not len(roi) == len(shape) == len(patch):
        raise ValueError(f"window {tuple(roi)}, image {tuple(shape)} and patch {tuple(patch)} differ in dimensions")
    return tuple(min(int(r), max(int(s), int(p))) for r, s, p in zip(roi, shape, patch, strict=True))
