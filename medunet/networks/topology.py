"""Per-level, per-axis strides and kernels of a U-Net config, and what follows from them.

A level's stride is the downsampling its first convolution (or max-pool) applies; its kernel is that
of both its convolutions (and of the decoder block at the same level). Level 0 never strides.
"""

from __future__ import annotations

import math

from medunet.config import NetworkConfig


def level_strides(cfg: NetworkConfig) -> list[tuple[int, ...]]:
    """``[(1, 1, 1), (2, 2, 1), ...]``: one entry per level of ``cfg.features``."""
    dims, levels = cfg.spatial_dims, len(cfg.features)
    if cfg.strides is None:
        return [(1,) * dims] + [(2,) * dims] * (levels - 1)
    strides = [tuple(int(s) for s in level) for level in cfg.strides]
    if len(strides) != levels or any(len(s) != dims for s in strides):
        raise ValueError(f"network.strides needs {levels} levels of {dims} values, got {cfg.strides}")
    if any(s not in (1, 2) for level in strides for s in level) or any(s != 1 for s in strides[0]):
        raise ValueError(f"network.strides: each value is 1 or 2 and the first level is all 1, got {cfg.strides}")
    return strides


def level_kernels(cfg: NetworkConfig) -> list[tuple[int, ...]]:
    """``[(3, 3, 1), (3, 3, 3), ...]``: one odd kernel per level and axis."""
    dims, levels = cfg.spatial_dims, len(cfg.features)
    if cfg.kernel_sizes is None:
        return [(3,) * dims] * levels
    kernels = [tuple(int(k) for k in level) for level in cfg.kernel_sizes]
    if len(kernels) != levels or any(len(k) != dims for k in kernels):
        raise ValueError(f"network.kernel_sizes needs {levels} levels of {dims} values, got {cfg.kernel_sizes}")
    if any(k < 1 or k % 2 == 0 for level in kernels for k in level):
        raise ValueError(f"network.kernel_sizes must be odd and positive, got {cfg.kernel_sizes}")
    return kernels


def total_stride(cfg: NetworkConfig) -> tuple[int, ...]:
    """Per axis, the product of the strides: window sides are multiples of it."""
    return tuple(math.prod(axis) for axis in zip(*level_strides(cfg), strict=True))


def receptive_field(cfg: NetworkConfig) -> tuple[int, ...]:
    """Theoretical receptive field per axis (voxels) of the U-Net: two convolutions per level on the
    way down and up, a downsample between levels."""
    strides, kernels = level_strides(cfg), level_kernels(cfg)
    fields = []
    for axis in range(cfg.spatial_dims):
        field, jump = 1, 1
        for level, (s, k) in enumerate(zip(strides, kernels, strict=True)):
            if level > 0:
                field += (s[axis] - 1) * jump  # the strided convolution or pool (kernel = stride)
                jump *= s[axis]
            field += 2 * (k[axis] - 1) * jump
        for level in range(len(strides) - 1, 0, -1):
            jump //= strides[level][axis]
            field += 2 * (kernels[level - 1][axis] - 1) * jump
        fields.append(field)
    return tuple(fields)
