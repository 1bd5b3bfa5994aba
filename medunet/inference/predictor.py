"""Segmenting one image: preprocess, sliding window with Gaussian blending, map back to the input grid.

Windows and slabs come from ``tiling.plan_tiles`` so that the process stays inside a memory budget
on any scan size; blended logits are reduced to labels slab by slab, so no full-size float copy of
the class scores is kept unless probabilities are asked for.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose, Spacingd

from medunet.config import InferConfig
from medunet.errors import InputError
from medunet.inference.backends import Engine
from medunet.inference.model import SegmentationModel
from medunet.inference.tiling import (
    TilePlan,
    TileRequest,
    default_memory_budget,
    plan_tiles,
    resident_memory,
)
from medunet.io import load_image
from medunet.runtime import freed_pages_kept, release_free_memory
from medunet.transforms import inference_transform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferOptions:
    """What ``medunet infer`` can be asked for beyond the model's own settings."""

    probabilities: bool = False  # keep the class probabilities (float16 in memory)
    tta: bool | None = None  # average over copies mirrored along ``infer.tta_axes`` (None: as the model says)
    largest_component: bool | None = None  # keep each class's largest component (None: as the model says)
    overlap: float | None = None  # least window overlap, a fraction of a window (default: the network's context)
    roi: tuple[int, ...] | None = None  # window size (default: the largest the budget allows)
    max_memory: int | None = None  # peak bytes to aim for (default: ``default_memory_budget()``)


@dataclass(frozen=True)
class Segmentation:
    labels: torch.Tensor  # (*S) uint8 class indices on the input's grid
    affine: np.ndarray  # the input's world affine (RAS)
    probabilities: torch.Tensor | None  # (K, *S) float16, when asked for
    source: str
    spacing: tuple[float, ...] = ()  # voxel size in mm along each axis of the input grid
    scan: np.ndarray | None = None  # first channel of the input, kept for QC pictures
    plan: TilePlan | None = None  # how the image was tiled (on the network's grid)


@dataclass
class Prepared:
    """A preprocessed image ready for the network, and what is needed to map results back."""

    x: MetaTensor  # (C, *S') on the network's grid
    transform: Compose
    input_shape: tuple[int, ...]
    affine: np.ndarray
    source: str
    slice_wise: bool  # a 2D model over a 3D volume


def prepare(image: MetaTensor, model: SegmentationModel, own: bool = False) -> Prepared:
    """Check channels and dimensions, then orient, resample and normalize like training did.

    Normalization works in place; ``own`` says the caller gives ``image`` up (a scan loaded for this
    call), otherwise a copy is normalized and ``image`` is left as it was.
    """
    source = str(image.meta.get("filename_or_obj", "image"))
    expected = model.network_config.in_channels
    if image.shape[0] != expected:
        raise InputError(source, f"has {image.shape[0]} channel(s); the model expects {expected}")
    image_dims = image.ndim - 1
    dims = model.preprocess.spatial_dims
    if not (image_dims == dims or (image_dims == 3 and dims == 2)):
        raise InputError(source, f"a {image_dims}D image cannot be segmented by a {dims}D model")
    if any(s < 1 for s in image.shape[1:]):
        raise InputError(source, f"image has an empty axis {tuple(image.shape[1:])}")
    transform = inference_transform(model.preprocess, image_dims)
    x = transform({"image": image if own else image.clone()})["image"]
    if not intensity_range(x).isfinite().all():
        raise InputError(source, "image holds NaN or infinite values")
    affine = np.asarray(image.affine)
    return Prepared(x, transform, tuple(image.shape[1:]), affine, source, image_dims != dims)


def intensity_range(x: torch.Tensor) -> torch.Tensor:
    """``[min, max]`` of ``x`` (NaN if it holds one), by reduction: no full-size temporary."""
    lo, hi = torch.aminmax(x)
    return torch.stack([lo, hi]).float()


def _predictor(network: Engine, tta_axes: Sequence[int]) -> Callable:
    """The window function: logits, averaged over every combination of mirrored ``tta_axes``
    (spatial axes, as the model's training flips)."""
    axes = [a + 2 for a in tta_axes]
    flips = [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]

    def run(window: torch.Tensor) -> torch.Tensor:
        window = window.float()  # float16 slabs of a large image are blended in half precision
        out = network(window).float()
        for flip in flips:
            out += network(window.flip(flip)).float().flip(flip)
        return out / (1 + len(flips)) if flips else out

    return run


def _slice_predictor(run: Callable, slices_at_once: int) -> Callable:
    """A 2D window function applied to every slice of a ``(B, C, H, W, D)`` window."""

    def run_slices(window: torch.Tensor) -> torch.Tensor:
        b, c, h, w, d = window.shape
        slices = window.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w)
        out = torch.cat([run(part) for part in slices.split(slices_at_once)])
        return out.reshape(b, d, -1, h, w).permute(0, 2, 3, 4, 1)

    return run_slices


def _window_device_budget(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free * 0.7)


@dataclass
class Predicted:
    """Blended network output on the network's grid, before it is mapped back to the input grid."""

    prep: Prepared
    labels: torch.Tensor  # (*S') uint8
    probs: torch.Tensor | None  # (K, *S') float16, when asked for or needed to resample back
    resampled: bool
    plan: TilePlan
    options: InferOptions


def segment_prepared(prep: Prepared, model: SegmentationModel, options: InferOptions) -> Segmentation:
    """Sliding-window inference over ``prep`` and the inverse of its preprocessing."""
    return finish(predict(prep, model, options), model)


def predict(prep: Prepared, model: SegmentationModel, options: InferOptions) -> Predicted:
    """Plan the windows within the memory budget and run them: the network's part of a scan."""
    x = prep.x
    engine = model.window_engine()
    device = engine.device
    num_classes = model.preprocess.num_classes
    dims = model.preprocess.spatial_dims
    shape = tuple(x.shape[1:])
    resampled = any(isinstance(t, Spacingd) for t in prep.transform.transforms)
    engine.release()
    release_free_memory()  # pages a previous scan freed are not taken
    roi = options.roi
    if roi is not None and len(roi) != dims:
        raise InputError(prep.source, f"--roi {roi} has {len(roi)} sides; the model is {dims}D")
    request = TileRequest(
        shape,
        model.description,
        model.preprocess.patch_size,
        num_classes,
        budget=options.max_memory or default_memory_budget(),
        committed=_committed_memory(prep, num_classes, options.probabilities, resampled),
        image_bytes=x.numel() * x.element_size(),
        window_device_budget=_window_device_budget(device),
        half_precision=device.type == "cuda",
        # float16 holds normalized intensities; an image left unnormalized may exceed its range
        half_allowed=bool(intensity_range(x).abs().max() < FLOAT16_SAFE),
        slice_wise=prep.slice_wise,
        slab_forward=engine.lean_forward,
        roi=roi,
        overlap=options.overlap,
    )
    try:
        plan = plan_tiles(request)
    except MemoryError as exc:
        raise InputError(prep.source, str(exc)) from None
    log.info("%s: %s", Path(prep.source).name, plan.describe(shape))
    if plan.half_blend:  # a large image is held and blended in float16 (the network still runs in float32)
        prep.x = x = MetaTensor(x.to(torch.float16), meta=x.meta, applied_operations=x.applied_operations)
    if options.tta and not model.infer.tta_axes:
        raise InputError(
            model.source, "--tta: this model was trained without mirroring, so mirrored copies would only hurt"
        )
    tta_axes = model.infer.tta_axes if (bool(model.infer.tta) if options.tta is None else options.tta) else ()
    run = _predictor(engine, tta_axes)
    if prep.slice_wise:
        run = _slice_predictor(run, plan.sw_batch_size)
    with freed_pages_kept():
        labels, probs = _blend(x.as_tensor(), run, plan, num_classes, device, options.probabilities or resampled)
    return Predicted(prep, labels, probs, resampled, plan, options)


# float16's largest value is 65504: intensities above this stay float32
FLOAT16_SAFE = 6e4


def _committed_memory(prep: Prepared, num_classes: int, probabilities: bool, resampled: bool) -> int:
    """What this process holds before the windows run, with what the scan will still need: the
    uint8 masks on both grids, float16 probabilities when asked for, and for a resampled scan the
    probabilities mapped back (float32 on both grids, with MONAI's sampling grid)."""
    shape = prep.x.shape[1:]
    committed = resident_memory() + 2 * math.prod(prep.input_shape)
    if probabilities:
        committed += math.prod(shape) * num_classes * 2
    if resampled:
        committed += math.prod(shape) * num_classes * 4 + math.prod(prep.input_shape) * (num_classes * 4 + 24)
    return committed


def finish(predicted: Predicted, model: SegmentationModel) -> Segmentation:
    """Map a prediction back to the input grid (exact for orientation, probabilities for resampling)
    and post-process it."""
    prep, options = predicted.prep, predicted.options
    labels, probs = _to_input_grid(prep, predicted.labels, predicted.probs, predicted.resampled)
    if probs is not None and not options.probabilities:
        probs = None
    labels = postprocess(labels, model.infer, model.preprocess.num_classes, options.largest_component)
    spacing = tuple(float(v) for v in np.linalg.norm(prep.affine[:-1, :-1], axis=0))
    return Segmentation(labels, prep.affine, probs, prep.source, spacing, plan=predicted.plan)


def _blend(
    x: torch.Tensor,
    run: Callable,
    plan: TilePlan,
    num_classes: int,
    device: torch.device,
    keep_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gaussian-blended sliding window, slab by slab along the last axis; labels (and float16
    probabilities) are filled in as each slab is done."""
    shape = tuple(x.shape[1:])
    depth = shape[-1]
    labels = torch.empty(shape, dtype=torch.uint8)
    probs = torch.empty((num_classes, *shape), dtype=torch.float16) if keep_probs else None
    amp = device.type == "cuda"
    for start in range(0, depth, plan.slab):
        stop = min(depth, start + plan.slab)
        lo, hi = plan.slab_bounds(start, depth)
        inferer = SlidingWindowInferer(
            roi_size=plan.layout.roi,
            sw_batch_size=1 if plan.slice_wise else plan.sw_batch_size,
            overlap=plan.layout.overlap,
            mode="gaussian",
            sw_device=device,
            device=device if plan.blend_on_device or device.type == "cpu" else torch.device("cpu"),
        )
        slab = x[None, ..., lo:hi]  # MONAI blends in the input's dtype: float16 for large images
        with torch.inference_mode(), torch.autocast(device.type, enabled=amp):
            logits = torch.as_tensor(inferer(slab, run))
        for z in range(start, stop, 16):  # argmax a few slices at a time: no full-size int64 index
            part = logits[0, ..., z - lo : min(stop, z + 16) - lo]
            labels[..., z : z + part.shape[-1]] = part.argmax(0).to(torch.uint8).cpu()
            if probs is not None:
                probs[..., z : z + part.shape[-1]] = torch.softmax(part.float(), dim=0).to(torch.float16).cpu()
        del logits, part  # before the next slab's buffers are made
    return labels, probs


def _to_input_grid(
    prep: Prepared, labels: torch.Tensor, probs: torch.Tensor | None, resampled: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Undo orientation (exact, on labels) and resampling (on probabilities, then argmax)."""

    def invert(t: torch.Tensor) -> torch.Tensor:
        if not prep.x.applied_operations:  # nothing was moved (a 2D picture): nothing to undo
            return t
        mapped = MetaTensor(t, meta=prep.x.meta, applied_operations=prep.x.applied_operations)
        return torch.as_tensor(prep.transform.inverse({"image": mapped})["image"])

    if resampled and probs is not None:
        probs = invert(probs.float())
        labels = probs.argmax(0).to(torch.uint8)
        probs = probs.to(torch.float16)
    else:
        labels = invert(labels[None])[0].to(torch.uint8)
        if probs is not None:
            probs = invert(probs).to(torch.float16)
    if tuple(labels.shape) != prep.input_shape:
        raise RuntimeError(f"inverted prediction {tuple(labels.shape)} != input {prep.input_shape}")
    return labels, probs


def postprocess(labels: torch.Tensor, infer: InferConfig, num_classes: int, largest: bool | None) -> torch.Tensor:
    """``labels`` after the largest-component filter: as ``infer`` says (the model's validation chose
    it) with ``largest`` None, else on every class (True) or not at all (False)."""
    if largest is None and infer.largest_component:
        classes = infer.largest_component_classes  # None: every class, as a filter set by hand
        return keep_largest_components(labels, num_classes, classes, infer.largest_component_foreground)
    return keep_largest_components(labels, num_classes) if largest else labels


def keep_largest_components(
    labels: torch.Tensor, num_classes: int, classes: Sequence[int] | None = None, foreground: bool = False
) -> torch.Tensor:
    """Keep only the largest connected component (face connectivity): of the foreground as a whole
    (every class together) with ``foreground``, then of each of ``classes`` (None: every foreground
    class) on its own; what is removed becomes background."""
    out = labels.numpy().copy()
    if foreground:
        out[(out > 0) & ~_largest_component(out > 0)] = 0
    for c in range(1, num_classes) if classes is None else classes:
        mask = out == c
        out[mask & ~_largest_component(mask)] = 0
    return torch.from_numpy(out)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """``mask``'s largest face-connected component (``mask`` itself when it has at most one)."""
    from scipy import ndimage

    components, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return np.asarray(components == sizes.argmax())


def segment_image(
    image: MetaTensor,
    model: SegmentationModel,
    probabilities: bool = False,
    overlap: float | None = None,
    options: InferOptions | None = None,
) -> Segmentation:
    """Segment a loaded channel-first image ``(C, *S)``; the result lies on the same grid.

    A 2D model segments a 3D volume slice by slice along the last axis.
    """
    opts = options or InferOptions(probabilities=probabilities, overlap=overlap)
    return segment_prepared(prepare(image, model), model, opts)


def segment(
    image: str | Path | Sequence[Path] | MetaTensor,
    model: SegmentationModel,
    probabilities: bool = False,
    series: str | None = None,
    options: InferOptions | None = None,
    keep_scan: bool = False,
    accept_damaged: bool = False,
) -> Segmentation:
    """Segment a file, a DICOM series folder or a loaded image with ``model``.

    A file is loaded here and released once preprocessed, so a large scan is not held twice;
    ``keep_scan`` keeps its first channel for QC pictures. ``series`` and ``accept_damaged`` choose and
    check a DICOM series (see ``load_image``). A scan without signal (every channel constant) gets a
    warning and an empty mask: a network's output on it means nothing.
    """
    opts = options or InferOptions(probabilities=probabilities)
    scan = load_scan(image, model, series, keep_scan, accept_damaged)
    return finish_scan(scan, finish(predict(scan.prep, model, opts), model))


@dataclass
class LoadedScan:
    """A scan read and preprocessed for the network: the first stage of segmenting it."""

    prep: Prepared
    blank: str | None  # what makes it blank (``no_signal``), or None
    scan: np.ndarray | None  # its first channel, kept for QC pictures
    checked: object = None  # what ``load_scan``'s ``check`` said of the loaded image (the input guard)


def load_scan(
    image: str | Path | Sequence[Path] | MetaTensor,
    model: SegmentationModel,
    series: str | None = None,
    keep_scan: bool = False,
    accept_damaged: bool = False,
    check: Callable[[MetaTensor], object] | None = None,
) -> LoadedScan:
    """Read ``image`` (unless loaded already), run ``check`` on it as read, and preprocess it."""
    if isinstance(image, MetaTensor):
        loaded = image
    else:
        dims = model.preprocess.spatial_dims
        paths = [Path(image)] if isinstance(image, str | Path) else list(image)
        loaded = load_image(
            paths,
            spatial_dims=(2, 3) if dims == 2 else dims,
            series=series,
            channels_in_file=len(model.preprocess.channels),
            accept_damaged=accept_damaged,
        )
    checked = check(loaded) if check is not None else None
    blank = no_signal(loaded, model.preprocess.channels)
    scan = loaded[0].numpy().copy() if keep_scan else None
    prep = prepare(loaded, model, own=loaded is not image)
    del loaded
    return LoadedScan(prep, blank, scan, checked)


def finish_scan(loaded: LoadedScan, seg: Segmentation) -> Segmentation:
    """``seg`` with what the loading stage knew: a blank scan's mask emptied, the scan kept for QC."""
    if loaded.blank is not None:
        log.warning("%s: the scan holds no signal (%s); its mask is left empty", seg.source, loaded.blank)
        seg.labels.zero_()
        if seg.probabilities is not None:
            seg.probabilities.zero_()
            seg.probabilities[0] = 1
    return replace(seg, scan=loaded.scan) if loaded.scan is not None else seg


def no_signal(image: torch.Tensor, channels: Sequence[str]) -> str | None:
    """What makes ``image`` blank, when every channel holds a single value: e.g. "every voxel is 0";
    ``None`` for a scan with signal (a NaN is refused later, in ``prepare``)."""
    values = []
    for c in range(image.shape[0]):
        lo, hi = intensity_range(image[c])
        if not bool(torch.isfinite(lo)) or float(lo) != float(hi):
            return None
        values.append(float(lo))
    if len(values) == 1:
        return f"every voxel is {values[0]:g}"
    names = list(channels) if len(channels) == len(values) else [str(c) for c in range(len(values))]
    return ", ".join(f"every {n} voxel is {v:g}" for n, v in zip(names, values, strict=True))
