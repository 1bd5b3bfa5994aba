"""``load_model``: any model reference (checkpoint, run, cross-validation run, bundle, registry URI,
exported graph) as a ``SegmentationModel`` whose windows run on the backend asked for."""

from __future__ import annotations

from pathlib import Path

import torch

from medunet.errors import InputError
from medunet.inference.backends import Backend
from medunet.inference.export import load_exported, with_backend
from medunet.inference.model import SegmentationModel, load_torch_model
from medunet.io.bundle_layout import is_bundle
from medunet.io.model_uri import is_registry_uri


def load_model(
    ref: str | Path,
    device: str | torch.device = "cpu",
    tracking_uri: str | None = None,
    backend: Backend | str | None = None,
    full_precision: bool = False,
) -> SegmentationModel:
    """Load a model from a checkpoint (``best.pt``), a run folder, a cross-validation run folder (its
    folds' ``best.pt`` as one ensemble), a medunet MONAI bundle folder, a registry URI
    (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) or a graph ``medunet export`` wrote (``.onnx``,
    OpenVINO ``.xml``).

    ``backend`` runs the windows: PyTorch, ONNX Runtime or OpenVINO (a PyTorch model's graph is then
    taken from its bundle's ``models/model.onnx`` or exported in memory), or ``auto``: see
    ``medunet.inference.export.with_backend``. By default a PyTorch model runs in PyTorch and an
    exported graph as ``auto`` says. ``full_precision`` keeps OpenVINO in float32.

    Nothing is executed while loading: configs are read as data, weights with ``weights_only``.
    """
    path = Path(ref)
    if not is_registry_uri(ref) and path.suffix.lower() in (".onnx", ".xml"):
        if not path.is_file():
            raise InputError(path, "no such model file")
        return load_exported(path, Backend(backend or Backend.AUTO), full_precision)
    model = load_torch_model(ref, device, tracking_uri)
    if backend is None or Backend(backend) is Backend.TORCH:
        return model
    onnx_file = path / "models" / "model.onnx" if is_bundle(path) else None
    graph = onnx_file if onnx_file is not None and onnx_file.is_file() else None
    return with_backend(model, Backend(backend), graph, full_precision)
