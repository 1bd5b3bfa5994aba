"""The planning rules: small pure functions from a dataset's statistics to one choice each.

Each returns its choice and the reason, in words, that the plan writes beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# An axis is "thick" when its spacing is at least this many times the finest axis's (nnU-Net's 3).
ANISOTROPY = 3.0
# An axis is pooled only while its spacing is within this factor of the finest axis's spacing...
POOL_SPACING_RATIO = 2.0
# ...and while it keeps at least this many voxels after pooling.
MIN_POOLED_SIZE = 8
MAX_LEVELS = 6
# A thick axis with fewer slices than this in the median case is better served by a 2D network.
MAX_SLICES_FOR_2D = 20


@dataclass(frozen=True)
class Choice:
    value: object
    reason: str


def target_spacing(spacings: Sequence[Sequence[float]]) -> tuple[tuple[float, ...] | None, str]:
    """The median spacing per axis; a thick axis keeps each case's own spacing (written as 0).

    Resampling slices of 10 mm to a median of 5 mm invents every other slice, and 5 mm slices to a
    10 mm median throw half away; along a thick axis each case therefore keeps its slices. When every
    case is already on the target grid, nothing is resampled (``None``).
    """
    arr = np.asarray(spacings, dtype=np.float64)
    median = np.median(arr, axis=0)
    finest = float(median.min())
    thick = [i for i, s in enumerate(median) if s >= ANISOTROPY * finest]
    target = [0.0 if i in thick else round(float(s), 4) for i, s in enumerate(median)]
    on_grid = all(np.allclose(arr[:, i], median[i], rtol=0.01) for i in range(arr.shape[1]) if i not in thick)
    varied = [i for i in thick if not np.allclose(arr[:, i], median[i], rtol=0.01)]
    parts = [f"median spacing {_mm(median.tolist())}"]
    if thick:
        axes = ", ".join(f"axis {i} ({median[i]:.3g} mm)" for i in thick)
        parts.append(
            f"{axes} is at least {ANISOTROPY:g}x the finest: each case keeps its own slices there "
            + (
                "(they differ between cases; resampling them would invent or throw away slices)"
                if varied
                else "(resampling a thick axis would invent or throw away slices)"
            )
        )
    if on_grid:
        parts.append("every case is already on this grid, so nothing is resampled")
        return None, "; ".join(parts)
    return tuple(target), "; ".join(parts) + f"; resampled to {target} (0: kept)"


def thick_axes(spacing: Sequence[float]) -> list[int]:
    finest = min(spacing)
    return [i for i, s in enumerate(spacing) if s >= ANISOTROPY * finest]


def choose_2d(image_dims: int, spacing: Sequence[float], shape: Sequence[float]) -> tuple[bool, str]:
    """2D for 2D images, and for stacks of few thick slices along the last axis; 3D otherwise."""
    if image_dims == 2:
        return True, "the images are 2D"
    thick = thick_axes(spacing)
    last = len(spacing) - 1
    if thick == [last] and shape[last] < MAX_SLICES_FOR_2D:
        ratio = spacing[last] / min(spacing)
        return True, (
            f"the last axis is {ratio:.1f}x coarser than the others with a median of {shape[last]:.0f} slices: a 3D "
            f"patch would span the whole stack with at most one or two poolings along it, at the cost of a 2D "
            f"network per slice, while a 2D network sees every slice as its own sample (more varied batches for "
            f"the same time)"
        )
    if thick:
        return False, f"axis {thick} is thick but holds {shape[thick[0]]:.0f} slices: 3D with anisotropic pooling"
    return False, "the spacing is near-isotropic: 3D context along every axis"


def strides_and_kernels(
    spacing: Sequence[float], patch: Sequence[int], min_size: int = MIN_POOLED_SIZE, max_levels: int = MAX_LEVELS
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Per level and axis, the strides and kernels of a U-Net for ``patch`` voxels at ``spacing``.

    An axis is pooled at a level while its current spacing is within ``POOL_SPACING_RATIO`` of the
    finest current spacing and it keeps at least ``min_size`` voxels after pooling; its kernel is 1 while
    it is not yet pooled and still that much coarser (a 3-wide kernel there mixes distant slices), 3
    otherwise. Levels stop when no axis can be pooled or at ``max_levels``.
    """
    dims = len(spacing)
    cur_spacing = [float(s) for s in spacing]
    size = [int(p) for p in patch]
    pooled_once = [False] * dims
    strides: list[tuple[int, ...]] = [(1,) * dims]
    kernels: list[tuple[int, ...]] = []

    def kernel_now() -> tuple[int, ...]:
        finest = min(cur_spacing)
        return tuple(
            1 if (not pooled_once[i] and cur_spacing[i] > POOL_SPACING_RATIO * finest) else 3 for i in range(dims)
        )

    kernels.append(kernel_now())
    while len(strides) < max_levels:
        finest = min(cur_spacing)
        pool = [cur_spacing[i] <= POOL_SPACING_RATIO * finest and size[i] // 2 >= min_size for i in range(dims)]
        if not any(pool):
            break
        strides.append(tuple(2 if p else 1 for p in pool))
        for i in range(dims):
            if pool[i]:
                cur_spacing[i] *= 2
                size[i] //= 2
                pooled_once[i] = True
        kernels.append(kernel_now())
    return strides, kernels


def patch_multiple(strides: Sequence[Sequence[int]]) -> tuple[int, ...]:
    return tuple(math.prod(axis) for axis in zip(*strides, strict=True))


def features_for(levels: int, base: int, cap: int) -> tuple[int, ...]:
    """Channels double per level from ``base`` up to ``cap``."""
    return tuple(min(base * 2**i, cap) for i in range(levels))


def shrink_patch(
    shape: Sequence[float],
    spacing: Sequence[float],
    fits: Callable[[tuple[int, ...]], bool],
    multiple: Sequence[int],
    smallest: int = 16,
) -> tuple[tuple[int, ...], int]:
    """The largest patch, starting from the median image ``shape`` (each side rounded up to its
    ``multiple``, the network's stride along it), that ``fits``; the side that is longest in
    millimetres is shortened first, by its multiple, so the patch tends towards a physical cube.
    No side is shortened below ``smallest`` (or its multiple). Returns the patch and the number of
    shortenings."""
    patch = [m * math.ceil(s / m) for s, m in zip(shape, multiple, strict=True)]
    floor = [max(m, min(smallest, p)) for m, p in zip(multiple, patch, strict=True)]
    steps = 0
    while not fits(tuple(patch)):
        candidates = [i for i in range(len(patch)) if patch[i] - multiple[i] >= floor[i]]
        if not candidates:
            break
        axis = max(candidates, key=lambda i: (patch[i] * spacing[i], patch[i]))
        patch[axis] -= multiple[axis]
        steps += 1
    return tuple(patch), steps


def mirror_axes(
    centroids: Sequence[dict[str, Sequence[float]]],
    label_names: dict[str, int],
    axes: Sequence[int],
    agreement: float = 0.9,
    min_offset_mm: float = 2.0,
    min_cases: int = 8,
) -> tuple[tuple[int, ...], str]:
    """Axes along which mirroring keeps the labels' meaning.

    For each pair of foreground classes and each axis, the sign of the offset between their centroids
    is counted over the cases that hold both: if one sign holds in at least ``agreement`` of them (and
    the mean offset is at least ``min_offset_mm``), one class lies consistently on one side of the other
    along that axis, a mirrored copy would teach the opposite, and that axis is not mirrored. Fewer than
    ``min_cases`` cases holding both classes are no evidence either way: that pair is not counted.
    """
    names = {str(v): k for k, v in label_names.items() if v != 0}
    reasons: list[str] = []
    blocked: set[int] = set()
    values = sorted(names, key=int)
    for ia, a in enumerate(values):
        for b in values[ia + 1 :]:
            pairs = [(c[a], c[b]) for c in centroids if a in c and b in c]
            if len(pairs) < min_cases:
                continue
            offsets = np.asarray([np.subtract(pa, pb) for pa, pb in pairs])
            for axis in axes:
                d = offsets[:, axis]
                share = max((d > 0).mean(), (d < 0).mean())
                if share >= agreement and abs(d.mean()) >= min_offset_mm and axis not in blocked:
                    side = "above" if d.mean() > 0 else "below"
                    reasons.append(
                        f"{names[a]} lies {side} {names[b]} along axis {axis} in {share:.0%} of cases"
                        f" ({abs(d.mean()):.1f} mm)"
                    )
                    blocked.add(axis)
    kept = tuple(a for a in axes if a not in blocked)
    if not reasons:
        return kept, "no class lies consistently on one side of another: every axis is mirrored"
    not_mirrored = ", ".join(str(a) for a in sorted(blocked))
    return kept, f"not mirrored along axis {not_mirrored}: " + "; ".join(reasons)


# A dataset with fewer training images than this leans on elastic deformation, as the U-Net paper's
# 30 EM sections did; elastic deformation is drawn for every other sample there.
FEW_IMAGES = 50


@dataclass(frozen=True)
class SpatialAugmentation:
    rotate_range: float  # radians
    rotate_in_plane: bool
    elastic_prob: float


def spatial_augmentation(
    image_dims: int, network_dims: int, thick: Sequence[int], flip_axes: Sequence[int], images: int
) -> tuple[SpatialAugmentation, str]:
    """Rotation and elastic deformation that fit the data's geometry and size.

    Thick slices (a 3D network with a thick axis, or a 2D network on 3D volumes) are rotated and
    deformed only in their plane, up to 29 degrees. Native 2D images mirrored along both axes (no class
    keeps a side of another) have no preferred orientation and are rotated by any angle; near-isotropic
    volumes are rotated up to 15 degrees about every axis. Fewer than ``FEW_IMAGES`` 2D training images
    are also deformed elastically half the time (the U-Net paper's remedy for few annotated images).
    """
    if thick or (network_dims == 2 and image_dims == 3):
        return SpatialAugmentation(0.5, bool(thick), 0.2), (
            "in-plane rotation (up to 29 degrees) and elastic deformation: the slices are thick, so only the "
            "plane is rotated or deformed"
        )
    if network_dims == 2:
        free = len(flip_axes) == 2
        few = images < FEW_IMAGES
        rotate = math.pi if free else 0.26
        reasons = [
            "rotation by any angle: no class keeps a side of another along either axis, so the images have no "
            "preferred orientation"
            if free
            else "rotation up to 15 degrees: the classes keep their sides along an axis"
        ]
        if few:
            reasons.append(
                f"elastic deformation half the time: {images} training images are few (under {FEW_IMAGES}), and "
                "deformed copies are what let a U-Net learn from few annotated images"
            )
        return SpatialAugmentation(rotate, False, 0.5 if few else 0.0), "; ".join(reasons)
    return SpatialAugmentation(0.26, False, 0.0), "rotation up to 15 degrees about every axis (near-isotropic voxels)"


def normalization_for(modalities: Sequence[str], nonzero_fraction: float) -> tuple[str, bool, str]:
    """``("ct", False, why)`` for CT (clip to the dataset's foreground 0.5/99.5 percentiles, z-score
    with its foreground mean and std); ``("zscore", nonzero, why)`` otherwise, per case, inside the
    non-zero region when that region is under three quarters of the image (skull-stripped or
    cropped scans, whose zero background would otherwise dominate the statistics)."""
    if modalities and all(m.strip().upper() == "CT" for m in modalities):
        return (
            "ct",
            False,
            (
                "CT: intensities mean the same in every scan, so they are clipped to the dataset's foreground "
                "0.5/99.5 percentiles and z-scored with its foreground mean and std"
            ),
        )
    nonzero = nonzero_fraction < 0.75
    where = f" inside the non-zero region (it covers {nonzero_fraction:.0%} of the median image)" if nonzero else ""
    return "zscore", nonzero, f"not CT ({', '.join(modalities)}): z-scored per case{where}"


def epochs_for(budget_seconds: float, epoch_seconds: float, overhead_seconds: float) -> tuple[int, str]:
    """As many whole epochs as fit the budget after the fixed costs (caching, validation)."""
    usable = max(budget_seconds - overhead_seconds, 0.0)
    epochs = max(1, int(usable // max(epoch_seconds, 1e-6)))
    return epochs, (
        f"{usable / 60:.1f} of the {budget_seconds / 60:.1f} minutes left after caching and validation, "
        f"at a measured {epoch_seconds:.1f} s per epoch: {epochs} epochs, cosine schedule over them"
    )


def loader_workers(device_kind: str, cpus: int) -> tuple[int, str]:
    """Data-loader processes that prepare the next batches (crop, augment) while a step computes.

    On CUDA the step is fast and the CPU cores feed it: all but one, at most 8. On CPU the step itself
    uses every core, yet one worker overlaps the batch's preparation with the step (on 2 cores it
    trained a 2D cardiac plan 10% faster, 0.168 s per step against 0.186 s in the training process,
    while augmentation still tracked MONAI metadata; since it runs without, 0.217 s against 0.202 s in
    one timing of each). It takes its time from the cores the step computes on, so the planner counts
    the augmentation in the CPU step estimate.
    """
    if device_kind == "cuda":
        workers = max(0, min(cpus - 1, 8))
        return workers, f"{workers} loader processes prepare the batches while the GPU computes ({cpus} CPU cores)"
    if cpus < 2:
        return 0, "batches are prepared in the training process (1 CPU core)"
    return 1, "one loader process prepares the next batch while a step computes"


# The training and validation cases may fill at most this share of the memory available when planning.
CACHE_SHARE = 0.5


def cache_rate(dataset_bytes: float, memory_bytes: float) -> tuple[float, str]:
    """The share of cases kept in memory after loading, resampling and normalization: all of them when
    they fit in ``CACHE_SHARE`` of the available memory, else as many as do (the others are read again
    each time they are drawn, which is slower but does not run the machine out of memory)."""
    budget = CACHE_SHARE * memory_bytes
    gib = 1024**3
    if dataset_bytes <= budget:
        return 1.0, f"every case is kept in memory after preprocessing (about {dataset_bytes / gib:.1f} GiB)"
    rate = math.floor(100 * budget / dataset_bytes) / 100
    return rate, (
        f"the preprocessed cases take about {dataset_bytes / gib:.1f} GiB, over {CACHE_SHARE:.0%} of the "
        f"{memory_bytes / gib:.1f} GiB available: {rate:.0%} of them are kept in memory, the others are read "
        "again each time they are drawn"
    )


def _mm(values: Sequence[float]) -> str:
    return "x".join(f"{v:.3g}" for v in values) + " mm"
