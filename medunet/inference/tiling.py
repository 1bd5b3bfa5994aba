"""Sliding-window tiling sized from the network and a memory budget.

MONAI's stock recipe covers a volume with fixed 96³ windows at 50% overlap, so each voxel goes
through the network about 2^dims times. Our networks are fully convolutional and take any size, so
the cheapest cover is the fewest, largest windows that fit the budget, overlapping only by the
context the network needs near a window's edge. A volume whose blending buffers would not fit is
segmented in slabs along its last axis, each slab with a margin of context on both sides.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import math
import os
import re
import resource
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from medunet import runtime
from medunet.config import NetworkConfig
from medunet.networks.topology import level_strides, total_stride
from medunet.networks.topology import receptive_field as axis_fields

GiB = 1024**3
MiB = 1024**2
# Memory one window's forward holds beyond its per-voxel maps (measured for the shipped 3D U-Net on
# CPU: 79 MB for a 40x56x40 window, 122 MB for 64³, 392 MB for 128x120x88 with 318 B per voxel counted).
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
    whole image (on a BraTS scan: Dice 0.992 against that pass at 2 GiB, 0.998 at 6 GB).
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


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only (the C library this process already has loaded)
    except (OSError, AttributeError):
        return None


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    try:
        return ctypes.CDLL(None).mallopt  # glibc only
    except (OSError, AttributeError):
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_LARGEST_THRESHOLD = 2**31 - 1  # mallopt takes an int
_STEADY_MMAP_THRESHOLD = 32 * MiB  # where glibc's own sliding threshold ends up after large frees


_tuning_lock = threading.Lock()
_tuned_callers = 0


@contextlib.contextmanager
def freed_pages_kept() -> Iterator[None]:
    """Keep the pages of freed tensors in this process while windows run, then hand them back.

    glibc returns every block over its mmap threshold (at most 32 MiB) to the system when it is
    freed, so each layer's new map of a large window starts on fresh pages that the kernel faults
    in and zeroes one by one: on this project's CPU machines that was a third of the process's time
    on a BraTS scan. Inside this context blocks up to 2 GiB come from the heap and stay there for
    the next layer; when the last caller leaves, the free pages go back (``malloc_trim``).

    The thresholds belong to the whole process, so this acts only where the process allowed it
    (``medunet.runtime.enable_allocator_tuning``: the command line does); callers in several threads
    share one setting, counted, so one leaving does not undo it under another. Elsewhere than glibc it
    does nothing.
    """
    global _tuned_callers
    mallopt, trim = _mallopt(), _malloc_trim()
    if mallopt is None or trim is None or not runtime.allocator_tuning():
        yield
        return
    with _tuning_lock:
        _tuned_callers += 1
        if _tuned_callers == 1:
            mallopt(_M_MMAP_THRESHOLD, _LARGEST_THRESHOLD)
            mallopt(_M_TRIM_THRESHOLD, _LARGEST_THRESHOLD)
    try:
        yield
    finally:
        with _tuning_lock:
            _tuned_callers -= 1
            if _tuned_callers == 0:
                mallopt(_M_MMAP_THRESHOLD, _STEADY_MMAP_THRESHOLD)
                mallopt(_M_TRIM_THRESHOLD, 2 * _STEADY_MMAP_THRESHOLD)  # glibc's ratio to the sliding threshold
                trim(0)


def release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the system.

    glibc keeps the pages of freed tensors (a previous scan, a previous recipe) resident, so
    ``resident_memory`` would count them as taken and plan smaller windows than the budget allows.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def window_bytes_per_voxel(cfg: NetworkConfig, half_precision: bool = False, lean_forward: bool = True) -> float:
    """Bytes one window voxel costs in a forward pass without gradients.

    A plain 3D U-Net runs its full-resolution level in slabs and in place at inference
    (``UNet._forward_lean``): about two maps of ``features[0]`` channels are alive there (the skip and
    the convolution's output; measured 209-291 B per voxel in all for a 16-feature 3D U-Net on CPU,
    windows of 1.4-4.7 M voxels). Otherwise (attention gates, group norm) the top decoder level
    holds about 6 such maps at once (the skip, the upsampled features, their concatenation and the
    convolution and norm outputs; measured 460-530 B per voxel). Deeper levels add about 6 maps at
    ``2^-dims`` of the voxels per level. The window's input, logits and their weighted copy add 4
    values per channel (8 for the plain forward, whose full-size convolutions add input and output
    workspace). ``lean_forward`` False: the engine runs the plain forward (a TorchScript export).
    """
    shrink, deeper = 1.0, 0.0
    for level, (f, s) in enumerate(zip(cfg.features, level_strides(cfg), strict=True)):
        shrink /= math.prod(s)
        deeper += f * shrink if level > 0 else 0.0
    if lean_forward and cfg.name == "unet" and cfg.norm in ("instance", "batch", "none") and cfg.spatial_dims == 3:
        maps, io = 2.0 * cfg.features[0] + 6.0 * deeper, 4
    else:
        maps, io = (8.0 if cfg.name == "attention_unet" else 6.0) * (cfg.features[0] + deeper), 8
    value_bytes = 2 if half_precision else 4
    ensemble = 4 * cfg.out_channels if cfg.ensemble > 1 else 0  # the members' running sum and one member's output
    return value_bytes * (maps + io * (cfg.in_channels + cfg.out_channels) + ensemble)


def blend_bytes_per_voxel(num_classes: int, half: bool = False) -> int:
    """Bytes MONAI's sliding window keeps per voxel of the region it blends: the weighted sum of class
    scores and the count map, in the input's dtype."""
    if half:
        return 2 * (num_classes + 1)
    return 4 * (num_classes + 1)


def receptive_field(cfg: NetworkConfig) -> int:
    """Theoretical receptive field of the U-Net along its widest axis (voxels); per axis in
    ``medunet.networks.topology.receptive_field``."""
    return max(axis_fields(cfg))


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


# Windows of a network without per-window statistics (batch norm, or none) overlap by a third of its
# receptive field, or by a sixth where a third would make them cover the image more than this many
# times (small windows under a tight budget). On a BraTS scan (batch norm) a third gave masks agreeing
# with MONAI's stock recipe at Dice 0.992, a sixth at 0.981; on a 512x512x600 scan under 2 GiB a
# third would have covered it 3.9 times, a sixth 1.75 times. Instance and group norm take their
# statistics from the window, so there fewer, larger windows count for more than context: on the
# hippocampus mosaic a third gave 8 windows instead of 4 and moved the masks away from one untiled
# pass (Dice 0.955 against 0.985) and from the labels; such networks keep a sixth.
CONTEXT_COVERAGE = 2.0


def plan_tiles(
    shape: Sequence[int],
    cfg: NetworkConfig,
    patch: Sequence[int],
    budget: int,
    committed: int,
    num_classes: int,
    window_device_budget: int | None = None,
    half_precision: bool = False,
    roi: Sequence[int] | None = None,
    overlap: float | None = None,
    image_bytes: int = 0,
    slice_wise: bool = False,
    half_allowed: bool = True,
    context: int | Sequence[int] | None = None,
    lean_forward: bool = True,
) -> TilePlan:
    """Choose windows and slabs so that ``committed`` bytes (the process and its loaded image, mask and
    probabilities) plus the blending buffers and one window's activations stay within ``budget``.

    A fifth of the budget is kept for what is not counted (transforms, writing, allocator slack).
    When the image's float32 buffers do not fit (and ``half_allowed``), it is blended in float16
    slabs and the float32 image (``image_bytes`` of ``committed``) is held in float16 too.

    ``slice_wise``: ``cfg`` is a 2D network run on every slice of a 3D ``shape``; windows tile the
    plane only and slabs need no margin. ``window_device_budget`` bounds the window activations
    separately when they live on a GPU; the blending buffers stay there only if they are small
    beside it. ``roi`` and ``overlap`` (a fraction, as MONAI's) override the automatic choice.

    ``context``: voxels neighbouring windows (and slabs) share, one value or one per axis; by default
    as ``CONTEXT_COVERAGE`` says, and narrower (down to one stride) where a budget is too tight to split
    the windows that far. ``lean_forward``: the windows cost what the PyTorch U-Net's slab-wise forward costs
    (see ``medunet.inference.backends.Engine``).
    """
    if context is None:
        plan_with = functools.partial(
            plan_tiles,
            shape,
            cfg,
            patch,
            budget,
            committed,
            num_classes,
            window_device_budget=window_device_budget,
            half_precision=half_precision,
            roi=roi,
            overlap=overlap,
            image_bytes=image_bytes,
            slice_wise=slice_wise,
            half_allowed=half_allowed,
            lean_forward=lean_forward,
        )
        return _plan_choosing_context(plan_with, cfg, shape, fixed_windows=roi is not None)
    window_dims = len(shape) - 1 if slice_wise else len(shape)
    multiple = list(total_stride(cfg))[:window_dims]
    assert context is not None
    context = _per_axis(context, len(shape))
    per_window_voxel = window_bytes_per_voxel(cfg, half_precision, lean_forward)
    usable = int(budget * 0.8)
    free = usable - committed
    plane = math.prod(shape[:-1])
    depth = shape[-1]
    minimum = math.prod(int(p) for p in patch[:window_dims])
    if free + (image_bytes // 2 if half_allowed else 0) <= 0:
        raise MemoryError(
            f"the memory budget ({budget / GiB:.2f} GiB) is already taken by the loaded image and the process "
            f"({committed / GiB:.2f} GiB); raise --max-memory"
        )
    # One float32 pass when the whole image's blending buffers take at most half of what is free;
    # otherwise float16 slabs, with half of what is free for the slab and half for the window.
    whole = plane * depth * blend_bytes_per_voxel(num_classes)
    half_blend = blend_on_device = False
    margin, slab = 0, depth
    if free > 0 and whole <= free // 2 and whole + minimum * per_window_voxel <= free:
        window_budget = free - whole
    else:
        half_blend = half_allowed
        free += image_bytes // 2 if half_allowed else 0
        slab_budget = free // 2
        window_budget = free - slab_budget
        per_voxel = blend_bytes_per_voxel(num_classes, half=half_allowed)
        if plane * depth * per_voxel > slab_budget:
            margin = 0 if slice_wise else min(max(context[-1] // 2, multiple[-1]), depth)
            slab = min(int(slab_budget // (plane * per_voxel)) - 2 * margin, depth)
            if not slice_wise:  # a slab at least as deep as the training patch, so MONAI does not pad it
                slab = max(slab, min(depth, int(patch[-1])) - 2 * margin)
            if slab < 1:
                raise MemoryError(
                    f"one slab of {plane} voxels per slice with its context does not fit the memory budget "
                    f"({budget / GiB:.2f} GiB, {committed / GiB:.2f} GiB already taken); raise --max-memory"
                )
    if window_device_budget is not None:
        blend_on_device = slab == depth and whole <= window_device_budget // 4
        window_budget = window_device_budget - (whole if blend_on_device else 0)
    slab_shape = (*shape[:-1], min(depth, slab + 2 * margin))
    window_shape = slab_shape[:window_dims]
    # no tensor of the top level (2 x features[0] channels) may pass 2^31 elements (CUDA kernels)
    # a forward also holds about WINDOW_OVERHEAD whatever its size (kernel workspaces, one slab's
    # temporaries): it shrinks large windows, but never below the training patch that fitted before
    fits = max(
        int((window_budget - WINDOW_OVERHEAD) // per_window_voxel), min(minimum, int(window_budget // per_window_voxel))
    )
    max_voxels = min(fits, 2**31 // (4 * cfg.features[0]))
    if roi is not None:
        roi_t = tuple(int(r) for r in roi)[:window_dims]
        ov = 0.5 if overlap is None else overlap
        counts = tuple(_monai_count(s, r, ov) for s, r in zip(window_shape, roi_t, strict=True))
        layout = Layout(roi_t, (ov,) * len(roi_t), counts)
    else:
        layout = layout_windows(window_shape, max_voxels, patch[:window_dims], multiple, context[:window_dims])
        if overlap is not None:
            layout = _layout_with_overlap(layout, window_shape, max_voxels, patch[:window_dims], multiple, overlap)
    batch = max(1, min(8, max_voxels // max(layout.window_voxels, 1), math.prod(layout.counts)))
    if slice_wise:  # one window spans the slab's depth; its slices go through the network ``batch`` at a time
        batch = max(1, min(16, max_voxels // max(layout.window_voxels, 1), slab_shape[-1]))
        layout = Layout((*layout.roi, slab_shape[-1]), (*layout.overlap, 0.0), (*layout.counts, 1))
    return TilePlan(slab, margin, layout, batch, budget, window_budget, half_blend, blend_on_device, slice_wise)


def _plan_choosing_context(
    plan_with: Callable[..., TilePlan], cfg: NetworkConfig, shape: Sequence[int], fixed_windows: bool
) -> TilePlan:
    """``plan_with(context=...)`` at the context ``CONTEXT_COVERAGE`` describes, per axis."""
    multiple, fields = total_stride(cfg), axis_fields(cfg)
    if len(multiple) < len(shape):  # a 2D network over a volume: its slabs need no context
        multiple, fields = (*multiple, 1), (*fields, 1)
    cheaper = [m * max(1, math.ceil(f / (6 * m))) for m, f in zip(multiple, fields, strict=True)]
    window_statistics = cfg.norm in ("instance", "group")
    wide = [m * max(1, math.ceil(f / (3 * m))) for m, f in zip(multiple, fields, strict=True)]
    context = cheaper if window_statistics else wide
    while True:
        try:
            plan: TilePlan = plan_with(context=context)
        except MemoryError:
            if all(c <= m for c, m in zip(context, multiple, strict=True)):
                raise
            context = [m * max(1, c // m // 2) for c, m in zip(context, multiple, strict=True)]
            continue
        costly = plan.network_voxels(shape) > CONTEXT_COVERAGE * math.prod(shape)
        if fixed_windows or not costly or all(c <= k for c, k in zip(context, cheaper, strict=True)):
            return plan
        context = cheaper
