"""Sliding-window tiling sized from the network and a memory budget.

MONAI's stock recipe covers a volume with fixed 96³ windows at 50% overlap, so each voxel goes
through the network about 2^dims times. Our networks are fully convolutional and take any size, so
the cheapest cover is the fewest, largest windows that fit the budget, overlapping only by the
context the network needs near a window's edge. A volume whose blending buffers would not fit is
segmented in slabs along its last axis, each slab with a margin of context on both sides.
"""

from __future__ import annotations

import math
import os
import re
import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

from medunet.networks.description import NetworkDescription

GiB = 1024**3
MiB = 1024**2
# Memory one window's forward holds whatever the window's size (kernel workspaces, one slab's
# temporaries), beyond its per-voxel maps (``NetworkDescription.activation_bytes_per_voxel``).
WINDOW_OVERHEAD = 64 * MiB

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3}
_UNITS |= {"kib": 1024, "mib": MiB, "gib": GiB, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_memory(text: str) -> int:
    """``"2GB"``, ``"1.5GiB"``, ``"800MB"``, ``"2e9"`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 2GB, 1.5GiB or 800MB")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return int(value)


def total_memory() -> int:
    """Physical memory of this machine (bytes)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * GiB


def default_memory_budget() -> int:
    """Peak resident memory ``medunet infer`` aims to stay under: a quarter of the machine, at most 2 GiB.

    Two GiB keeps a 512x512x600 CT on a laptop; a larger budget (``--max-memory``) buys larger
    windows and so fewer window edges, where a voxel sees less context than in one pass over the
    whole image.
    """
    return min(2 * GiB, total_memory() // 4)


def resident_memory() -> int:
    """Memory this process holds now (Linux ``/proc``; elsewhere its peak so far, an upper bound)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def blend_bytes_per_voxel(num_classes: int, half: bool = False) -> int:
    """Bytes MONAI's sliding window keeps per voxel of the region it blends: the weighted sum of class
    scores and the count map, in the input's dtype."""
    if half:
        return 2 * (num_classes + 1)
    return 4 * (num_classes + 1)


def _per_axis(value: int | Sequence[int], dims: int) -> list[int]:
    return [int(value)] * dims if isinstance(value, int) else [int(v) for v in value][:dims]


@dataclass(frozen=True)
class Layout:
    """Windows for one image (or slab): MONAI ``roi_size`` and per-axis ``overlap`` that give ``counts``."""

    roi: tuple[int, ...]
    overlap: tuple[float, ...]
    counts: tuple[int, ...]

    @property
    def window_voxels(self) -> int:
        return math.prod(self.roi)

    def coverage(self, shape: Sequence[int]) -> float:
        """Voxels fed to the network per image voxel (1.0 = each voxel once)."""
        return math.prod(self.counts) * self.window_voxels / math.prod(shape)


def layout_windows(
    shape: Sequence[int],
    max_window_voxels: int,
    patch: Sequence[int],
    multiple: int | Sequence[int],
    context: int | Sequence[int],
) -> Layout:
    """The fewest windows that cover ``shape``, each at most ``max_window_voxels``.

    Neighbouring windows overlap by at least ``context`` voxels; window sides are multiples of
    ``multiple`` (the network's total stride) where they are smaller than the image, and never
    smaller than the training ``patch`` (MONAI pads an image smaller than that). ``multiple`` and
    ``context`` are one value for every axis or one per axis.
    """
    dims = len(shape)
    mult, ctx = _per_axis(multiple, dims), _per_axis(context, dims)
    counts = [1] * dims
    while True:
        roi = [_side(s, n, p, m, c) for s, n, p, m, c in zip(shape, counts, patch, mult, ctx, strict=True)]
        if math.prod(roi) <= max_window_voxels:
            break
        splittable = [i for i in range(dims) if roi[i] > max(patch[i], ctx[i] + mult[i], mult[i])]
        if not splittable:
            raise MemoryError(f"one window of {tuple(roi)} voxels does not fit the memory budget; raise --max-memory")
        axis = max(splittable, key=lambda i: (roi[i], i))
        counts[axis] += 1
    overlaps = []
    for s, r, n in zip(shape, roi, counts, strict=True):
        if n == 1 or r >= s:
            overlaps.append(0.0)
            continue
        stride = math.ceil((s - r) / (n - 1))
        # MONAI's interval is int(roi * (1 - overlap)); stay a hair below so it rounds to ``stride``.
        overlaps.append(max((r - stride) / r - 1e-7, 0.0))
    counts = [_monai_count(s, r, o) for s, r, o in zip(shape, roi, overlaps, strict=True)]
    return Layout(tuple(roi), tuple(overlaps), tuple(counts))


def _layout_with_overlap(
    layout: Layout,
    shape: Sequence[int],
    max_window_voxels: int,
    patch: Sequence[int],
    multiple: Sequence[int],
    overlap: float,
) -> Layout:
    """The cheapest layout whose neighbouring windows overlap by at least ``overlap`` of their side.

    Candidates: ``layout``'s windows, with more of them where the overlap needs it, and layouts
    re-laid with the overlap as their context (rounded up to ``multiple``), whose windows may grow
    to take it within the budget.
    """

    def at_least(lay: Layout) -> Layout:  # MONAI's interval, int(roi * (1 - overlap)), keeps at least it
        overlaps = tuple(o if n == 1 else overlap for o, n in zip(lay.overlap, lay.counts, strict=True))
        counts = tuple(_monai_count(s, r, o) for s, r, o in zip(shape, lay.roi, overlaps, strict=True))
        return Layout(lay.roi, overlaps, counts)

    candidates = [at_least(layout)]
    for _ in range(4):
        split = [r for r, n in zip(layout.roi, layout.counts, strict=True) if n > 1]
        context = [m * math.ceil(overlap * max(split, default=0) / m) for m in multiple]
        try:
            relaid = layout_windows(shape, max_window_voxels, patch, multiple, context)
        except MemoryError:  # a context this wide leaves no axis to split: more of the smaller windows
            break
        if relaid == layout:
            break
        layout = relaid
        candidates.append(at_least(layout))
    return min(candidates, key=lambda lay: lay.coverage(shape))


def _side(size: int, count: int, patch: int, multiple: int, context: int) -> int:
    if size <= patch:
        return patch
    if count == 1:
        return size
    side = math.ceil((size + (count - 1) * context) / count)
    side = multiple * math.ceil(side / multiple)
    return max(min(side, size), patch)


def _monai_count(size: int, roi: int, overlap: float) -> int:
    if roi >= size:
        return 1
    interval = max(int(roi * (1 - overlap)), 1)
    return math.ceil((size - roi) / interval) + 1


@dataclass(frozen=True)
class TilePlan:
    """How one image is segmented: slabs along the last axis, and the windows inside each slab."""

    slab: int  # kept slices per slab along the last axis (== depth: one pass over the whole image)
    margin: int  # context slices added on both sides of a slab
    layout: Layout  # windows of a full slab
    sw_batch_size: int  # windows per network call (slices per call for a 2D network over a volume)
    budget: int
    window_budget: int
    half_blend: bool = False  # blend slabs in float16 (large images), else float32
    blend_on_device: bool = False  # blending buffers on the GPU (else in CPU memory)
    slice_wise: bool = False  # a 2D network over a volume: windows span the slab's depth

    def slab_bounds(self, start: int, depth: int) -> tuple[int, int]:
        """Input slices ``[lo, hi)`` for the slab kept at ``start``: its margins, shifted inward at the
        image's ends so that every slab has the planned depth (real slices rather than padding)."""
        size = min(depth, self.slab + 2 * self.margin)
        lo = max(0, min(start - self.margin, depth - size))
        return lo, lo + size

    def describe(self, shape: Sequence[int]) -> str:
        slabs = math.ceil(shape[-1] / self.slab)
        where = f"{slabs} slabs of {self.slab}+2x{self.margin} slices" if slabs > 1 else "one pass"
        if self.half_blend:
            where += ", float16 blending"
        return (
            f"windows {'x'.join(map(str, self.layout.roi))} ({math.prod(self.layout.counts)} per pass, "
            f"{where}, coverage {self.layout.coverage(self._slab_shape(shape)):.2f}), "
            f"budget {self.budget / GiB:.2f} GiB"
        )

    def network_voxels(self, shape: Sequence[int]) -> int:
        """Voxels fed to the network for an image of ``shape`` (every slab's windows)."""
        total = 0
        for start in range(0, shape[-1], self.slab):
            lo, hi = self.slab_bounds(start, shape[-1])
            slab = (*shape[:-1], hi - lo)
            counts = [_monai_count(s, r, o) for s, r, o in zip(slab, self.layout.roi, self.layout.overlap, strict=True)]
            total += math.prod(counts) * self.layout.window_voxels
        return total

    def _slab_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return (*shape[:-1], min(shape[-1], self.slab + 2 * self.margin))


# Windows of a network whose output does not depend on the window's statistics overlap by a third
# of its receptive field, or by a sixth where a third would make them cover the image more than
# CONTEXT_COVERAGE times (small windows under a tight budget). Networks with window statistics
# (instance, group norm) keep a sixth: for them fewer, larger windows count for more than context.
# The measurements behind both rules are in the README ("How windows are planned").
CONTEXT_COVERAGE = 2.0
WIDE_CONTEXT, NARROW_CONTEXT = 3, 6  # context = receptive field / this, rounded up to the stride
# A fifth of the budget is kept for what the plan does not count: transforms, writing, allocator slack.
UNCOUNTED_SHARE = 0.2
# One GPU kernel indexes at most this many elements of one tensor.
INDEX_LIMIT = 2**31
# Windows per network call, and slices per call for a 2D network over a volume: larger batches
# gained nothing on CPU and cost memory the windows' size could use instead.
MAX_WINDOWS_PER_CALL, MAX_SLICES_PER_CALL = 8, 16


@dataclass(frozen=True)
class TileRequest:
    """Everything tile planning reads: the image, what the network says about itself and the memory.

    ``committed``: bytes already taken (the process, the loaded image, masks and probabilities), of
    which ``image_bytes`` are the float32 image, which may be held in float16 when ``half_allowed``.
    ``window_device_budget``: the windows' activations live on a GPU with this much free.
    ``slice_wise``: a 2D network over every slice of a 3D ``shape``. ``slab_forward``: the engine
    runs the network's slab forward (``medunet.inference.backends.Engine.lean_forward``).
    ``roi`` and ``overlap`` (a fraction, as MONAI's) override the automatic windows; ``context``
    (voxels neighbouring windows and slabs share, per axis) overrides the automatic context.
    """

    shape: tuple[int, ...]
    network: NetworkDescription
    patch: tuple[int, ...]
    num_classes: int
    budget: int
    committed: int
    image_bytes: int = 0
    window_device_budget: int | None = None
    half_precision: bool = False
    half_allowed: bool = True
    slice_wise: bool = False
    slab_forward: bool = True
    roi: tuple[int, ...] | None = None
    overlap: float | None = None
    context: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:  # sides as int tuples; one context value stands for every axis
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        object.__setattr__(self, "patch", tuple(int(v) for v in self.patch))
        if self.roi is not None:
            object.__setattr__(self, "roi", tuple(int(v) for v in self.roi))
        if self.context is not None:
            object.__setattr__(self, "context", tuple(_per_axis(self.context, len(self.shape))))

    @property
    def window_dims(self) -> int:
        return len(self.shape) - 1 if self.slice_wise else len(self.shape)

    @property
    def contexts(self) -> tuple[int, ...]:
        """The context per axis (planning with a context given)."""
        assert self.context is not None and not isinstance(self.context, int)
        return self.context

    @property
    def multiple(self) -> list[int]:
        """Window sides are multiples of the network's stride (per window axis)."""
        return list(self.network.stride)[: self.window_dims]

    @property
    def bytes_per_window_voxel(self) -> float:
        return self.network.activation_bytes_per_voxel(self.half_precision, self.slab_forward)


@dataclass(frozen=True)
class BudgetSplit:
    """The budget left once ``committed`` is taken, split between blending buffers and windows."""

    window_budget: int
    slab: int  # kept slices per slab along the last axis (the whole depth: one pass)
    margin: int
    half_blend: bool
    blend_on_device: bool


def plan_tiles(request: TileRequest) -> TilePlan:
    """Windows and slabs such that ``committed`` bytes, the blending buffers and one call's window
    activations stay within the budget, less its uncounted share. Raises ``MemoryError`` (with the
    advice to raise ``--max-memory``) where nothing fits."""
    if request.context is None:
        return _with_chosen_context(request)
    split = split_budget(request)
    depth = request.shape[-1]
    slab_shape = (*request.shape[:-1], min(depth, split.slab + 2 * split.margin))
    max_voxels = window_voxel_limit(request, split.window_budget)
    layout = lay_out_windows(request, slab_shape[: request.window_dims], max_voxels)
    batch = max(1, min(MAX_WINDOWS_PER_CALL, max_voxels // max(layout.window_voxels, 1), math.prod(layout.counts)))
    if request.slice_wise:  # one window spans the slab's depth; its slices go through the network ``batch`` at a time
        batch = max(1, min(MAX_SLICES_PER_CALL, max_voxels // max(layout.window_voxels, 1), slab_shape[-1]))
        layout = Layout((*layout.roi, slab_shape[-1]), (*layout.overlap, 0.0), (*layout.counts, 1))
    return TilePlan(
        split.slab,
        split.margin,
        layout,
        batch,
        request.budget,
        split.window_budget,
        split.half_blend,
        split.blend_on_device,
        request.slice_wise,
    )


def split_budget(request: TileRequest) -> BudgetSplit:
    """One float32 pass over the whole image when its blending buffers take at most half of what is
    free; otherwise float16 slabs along the last axis (the float32 image held in float16 too), half
    of what is free for the slab's buffers and half for the windows."""
    shape, depth = request.shape, request.shape[-1]
    plane = math.prod(shape[:-1])
    free = int(request.budget * (1 - UNCOUNTED_SHARE)) - request.committed
    freed_by_half = request.image_bytes // 2 if request.half_allowed else 0
    minimum = math.prod(request.patch[: request.window_dims])
    if free + freed_by_half <= 0:
        raise MemoryError(
            f"the memory budget ({request.budget / GiB:.2f} GiB) is already taken by the loaded image and the "
            f"process ({request.committed / GiB:.2f} GiB); raise --max-memory"
        )
    whole = plane * depth * blend_bytes_per_voxel(request.num_classes)
    window_budget, slab, margin, half_blend = free - whole, depth, 0, False
    if not (free > 0 and whole <= free // 2 and whole + minimum * request.bytes_per_window_voxel <= free):
        half_blend, free = request.half_allowed, free + freed_by_half
        slab_budget = free // 2
        window_budget = free - slab_budget
        per_voxel = blend_bytes_per_voxel(request.num_classes, half=request.half_allowed)
        if plane * depth * per_voxel > slab_budget:
            slab, margin = _slab_depth(request, slab_budget // (plane * per_voxel))
    blend_on_device = False
    if request.window_device_budget is not None:  # blending stays on the GPU only if small beside the windows
        blend_on_device = slab == depth and whole <= request.window_device_budget // 4
        window_budget = request.window_device_budget - (whole if blend_on_device else 0)
    return BudgetSplit(window_budget, slab, margin, half_blend, blend_on_device)


def _slab_depth(request: TileRequest, fitting_slices: int) -> tuple[int, int]:
    """Kept slices per slab and the margin of context on both sides, for a slab buffer of at most
    ``fitting_slices``. A 3D network's slab is at least as deep as its training patch (MONAI would
    pad a shallower one); a 2D network's slices need no context."""
    depth = request.shape[-1]
    margin = 0 if request.slice_wise else min(max(request.contexts[-1] // 2, request.multiple[-1]), depth)
    slab = min(fitting_slices - 2 * margin, depth)
    if not request.slice_wise:
        slab = max(slab, min(depth, int(request.patch[-1])) - 2 * margin)
    if slab < 1:
        raise MemoryError(
            f"one slab of {math.prod(request.shape[:-1])} voxels per slice with its context does not fit the memory "
            f"budget ({request.budget / GiB:.2f} GiB, {request.committed / GiB:.2f} GiB already taken); "
            "raise --max-memory"
        )
    return slab, margin


def window_voxel_limit(request: TileRequest, window_budget: int) -> int:
    """Voxels one network call may take: the window budget less a forward's fixed ``WINDOW_OVERHEAD``
    (never below the training patch, which fitted before), and no map past half of ``INDEX_LIMIT``."""
    per_voxel = request.bytes_per_window_voxel
    minimum = math.prod(request.patch[: request.window_dims])
    fits = max(int((window_budget - WINDOW_OVERHEAD) // per_voxel), min(minimum, int(window_budget // per_voxel)))
    return min(fits, INDEX_LIMIT // (2 * request.network.widest_map_channels))


def lay_out_windows(request: TileRequest, window_shape: Sequence[int], max_voxels: int) -> Layout:
    """The given ``roi`` at its ``overlap`` (MONAI's 0.5 by default), or the fewest windows of at most
    ``max_voxels`` with the request's context (and at least its ``overlap``)."""
    dims = request.window_dims
    if request.roi is not None:
        roi = tuple(int(r) for r in request.roi)[:dims]
        overlap = 0.5 if request.overlap is None else request.overlap
        counts = tuple(_monai_count(s, r, overlap) for s, r in zip(window_shape, roi, strict=True))
        return Layout(roi, (overlap,) * len(roi), counts)
    patch, multiple = request.patch[:dims], request.multiple
    layout = layout_windows(window_shape, max_voxels, patch, multiple, request.contexts[:dims])
    if request.overlap is not None:
        layout = _layout_with_overlap(layout, window_shape, max_voxels, patch, multiple, request.overlap)
    return layout


def _with_chosen_context(request: TileRequest) -> TilePlan:
    """The plan at the context ``CONTEXT_COVERAGE`` describes, per axis, narrowed (down to one stride)
    where the budget is too tight to split the windows that far."""
    multiple, fields = request.network.stride, request.network.receptive_field
    if len(multiple) < len(request.shape):  # a 2D network over a volume: its slabs need no context
        multiple, fields = (*multiple, 1), (*fields, 1)
    narrow = tuple(m * max(1, math.ceil(f / (NARROW_CONTEXT * m))) for m, f in zip(multiple, fields, strict=True))
    wide = tuple(m * max(1, math.ceil(f / (WIDE_CONTEXT * m))) for m, f in zip(multiple, fields, strict=True))
    context = narrow if request.network.window_statistics else wide
    while True:
        try:
            plan = plan_tiles(replace(request, context=context))
        except MemoryError:
            if all(c <= m for c, m in zip(context, multiple, strict=True)):
                raise
            context = tuple(m * max(1, c // m // 2) for c, m in zip(context, multiple, strict=True))
            continue
        costly = plan.network_voxels(request.shape) > CONTEXT_COVERAGE * math.prod(request.shape)
        if request.roi is not None or not costly or all(c <= k for c, k in zip(context, narrow, strict=True)):
            return plan
        context = narrow
