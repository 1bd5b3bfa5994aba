"""Segmenting one image: preprocess, sliding window with Gaussian blending, map back to the input grid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer, SlidingWindowInferer

from medunet.errors import InputError
from medunet.inference.model import SegmentationModel
from medunet.io import load_image
from medunet.transforms import inference_transform
from medunet.transforms.windows import fit_window


@dataclass(frozen=True)
class Segmentation:
    labels: torch.Tensor  # (*S) uint8 class indices on the input's grid
    affine: np.ndarray  # the input's world affine (RAS)
    probabilities: torch.Tensor | None  # (K, *S) float32, when asked for
    source: str


def segment_image(
    image: MetaTensor, model: SegmentationModel, probabilities: bool = False, overlap: float | None = None
) -> Segmentation:
    """Segment a loaded channel-first image ``(C, *S)``; the result lies on the same grid.

    A 2D model segments a 3D volume slice by slice along the last axis (MONAI's ``SliceInferer``).
    """
    source = str(image.meta.get("filename_or_obj", "image"))
    expected = model.network_config.in_channels
    if image.shape[0] != expected:
        raise InputError(source, f"has {image.shape[0]} channel(s); the model expects {expected}")
    image_dims = image.ndim - 1
    transform = inference_transform(model.preprocess, image_dims)
    x = transform({"image": image})["image"]
    device = next(model.network.parameters()).device
    batch, mode = model.infer.sw_batch_size, model.infer.mode
    dims = model.preprocess.spatial_dims
    shape = x.shape[1 : 1 + dims] if image_dims == dims else x.shape[1:3]
    roi = fit_window(model.roi_size, shape, model.preprocess.patch_size)
    ov = model.infer.overlap if overlap is None else overlap
    inferer: SlidingWindowInferer
    if image_dims == model.preprocess.spatial_dims:
        inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=batch, overlap=ov, mode=mode)
    elif image_dims == 3 and model.preprocess.spatial_dims == 2:
        inferer = SliceInferer(roi_size=roi, sw_batch_size=batch, overlap=ov, mode=mode, spatial_dim=2)
    else:
        dims = model.preprocess.spatial_dims
        raise InputError(source, f"a {image_dims}D image cannot be segmented by a {dims}D model")
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
        logits = inferer(x.as_tensor()[None].to(device), model.network)
    probs = torch.softmax(torch.as_tensor(logits).float(), dim=1)[0].cpu()
    mapped = MetaTensor(probs, meta=x.meta, applied_operations=x.applied_operations)
    probs = torch.as_tensor(transform.inverse({"image": mapped})["image"])
    if tuple(probs.shape[1:]) != tuple(image.shape[1:]):
        raise RuntimeError(f"inverted prediction {tuple(probs.shape[1:])} != input {tuple(image.shape[1:])}")
    labels = probs.argmax(0).to(torch.uint8)
    return Segmentation(labels, np.asarray(image.affine), probs if probabilities else None, source)


def segment(
    image: str | Path | list[Path] | MetaTensor,
    model: SegmentationModel,
    probabilities: bool = False,
    series: str | None = None,
) -> Segmentation:
    """Segment a file, a DICOM series folder or a loaded image with ``model``."""
    if not isinstance(image, MetaTensor):
        dims = model.preprocess.spatial_dims
        image = load_image(image, spatial_dims=(2, 3) if dims == 2 else dims, series=series)
    return segment_image(image, model, probabilities)
