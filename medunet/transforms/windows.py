"""Sliding-window sizes."""

from __future__ import annotations

from collections.abc import Sequence


def fit_window(roi: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """The window, shrunk to the image where the image is smaller.

    MONAI pads an image smaller than the window with zeros; a network with instance norm then sees
    statistics it never saw in training. Our networks take any input size, so the window shrinks instead.
    """
    if len(roi) != len(shape):
        raise ValueError(f"window {tuple(roi)} and image {tuple(shape)} differ in dimensions")
    return tuple(min(int(r), int(s)) for r, s in zip(roi, shape, strict=True))
