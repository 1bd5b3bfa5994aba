"""Dictionary transforms that load a case through ``medunet.io`` and check its geometry."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medunet.errors import InputError
from medunet.io import load_image
from medunet.io.headers import Header, check_same_grid
from medunet.io.readers import meta_without_affine


def check_same_geometry(image: MetaTensor, label: MetaTensor, label_path: str) -> None:
    """Refuse a label whose grid (shape and affine) differs from its loaded image's."""
    check_same_grid(
        label_path,
        Header(tuple(image.shape[1:]), np.asarray(image.affine)),
        Header(tuple(label.shape[1:]), np.asarray(label.affine)),
    )


def take_slice(img: MetaTensor, index: int) -> MetaTensor:
    """The 2D slice ``index`` along the last axis of ``(C, X, Y, Z)``, with a 3x3 in-plane affine."""
    if not 0 <= index < img.shape[-1]:
        raise InputError(img.meta.get("filename_or_obj", "?"), f"slice {index} outside 0..{img.shape[-1] - 1}")
    affine = torch.as_tensor(img.affine, dtype=torch.float64)
    a2 = torch.eye(3, dtype=torch.float64)
    a2[:2, :2] = affine[:2, :2]
    a2[:2, 2] = affine[:2, 3] + affine[:2, 2] * index
    meta = {k: v for k, v in img.meta.items() if k not in ("affine", "spatial_shape", "original_affine")}
    return MetaTensor(img.as_tensor()[..., index].clone(), affine=a2, meta=meta)


class LoadCased(MapTransform):
    """Load ``image`` (list of channel files) and optional ``label``, check they share a grid, and
    apply ``label_map``. Produces ``image`` ``(C, *S)`` float32 and ``label`` ``(1, *S)`` class indices.

    ``spatial_dims`` is the dimensionality of the files (3 for a 2D view of 3D volumes, whose slices
    are taken later by ``TakeSliced``, after the volume has been oriented and normalized).
    """

    def __init__(self, spatial_dims: int, label_map: tuple[tuple[int, int], ...] = (), channels: int = 1) -> None:
        super().__init__(keys=["image", "label"], allow_missing_keys=True)
        self.spatial_dims = spatial_dims
        self.label_map = dict(label_map)
        self.channels = channels  # a single image file holding more channels keeps them on its last axis

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get("slice") is not None:  # one slice of a volume: its neighbours' items read the same files
            key = (tuple(d["image"]) if isinstance(d["image"], list | tuple) else d["image"], d.get("label"))
            image, label = self._recent.get(key, lambda: self._load(d))
            d["image"] = image.clone()
            if label is not None:
                d["label"] = label.clone()
            return d
        image, label = self._load(d)
        d["image"] = image
        if label is not None:
            d["label"] = label
        return d

    def _load(self, d: Mapping[Hashable, Any]) -> tuple[MetaTensor, MetaTensor | None]:
        image = load_image(d["image"], spatial_dims=self.spatial_dims, channels_in_file=self.channels)
        if "label" not in d:
            return image, None
        label = load_image(d["label"], spatial_dims=self.spatial_dims)
        check_same_geometry(image, label, str(d["label"]))
        return image, self._map_labels(label, str(d["label"]))

    @functools.cached_property
    def _recent(self) -> _Recent:
        return _Recent(4)

    def _map_labels(self, label: MetaTensor, path: str) -> MetaTensor:
        values = torch.round(label.as_tensor())
        if self.label_map:
            mapped = torch.full_like(values, -1)
            for file_value, index in self.label_map.items():
                mapped[values == file_value] = index
            if (mapped < 0).any():
                found = sorted(int(v) for v in torch.unique(values).tolist())
                raise InputError(path, f"label values {found} are not all in label_map {sorted(self.label_map)}")
            values = mapped
        return MetaTensor(values.to(torch.uint8), affine=label.affine, meta=meta_without_affine(label.meta))


class _Recent:
    """The last few loaded volumes (thread-safe), so the slices of one volume load it once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[Hashable, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = load()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value

    def __getstate__(self) -> dict[str, Any]:  # loader worker processes start with an empty cache
        return {"size": self.size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["size"])  # type: ignore[misc]


class TakeSliced(MapTransform):
    """Replace 3D ``image``/``label`` by their slice ``data["slice"]`` along the last axis (a no-op
    for items without a ``slice``)."""

    def __init__(self) -> None:
        super().__init__(keys=["image", "label"], allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get("slice") is None:
            return d
        for key in self.key_iterator(d):
            d[key] = take_slice(d[key], int(d["slice"]))
        return d
