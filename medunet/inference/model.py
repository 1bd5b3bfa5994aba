"""A trained model as inference needs it: network, preprocessing, labels and window."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medunet.config import InferConfig, NetworkConfig, PreprocessConfig
from medunet.errors import InputError
from medunet.inference.backends import Engine, TorchEngine
from medunet.io.bundle_layout import is_bundle, read_bundle_model, read_bundle_payload
from medunet.io.model_file import ModelFile, label_values, read_model_file, read_run_model, run_checkpoints
from medunet.io.model_file import ensemble_payload as ensemble_payload  # re-exported: it lived here
from medunet.io.model_uri import download_registered_bundle, is_registry_uri
from medunet.io.run_layout import fold_checkpoints as fold_checkpoints  # re-exported: it lived here
from medunet.networks import NetworkDescription, create_network, describe_network


@dataclass(frozen=True)
class SegmentationModel:
    network: nn.Module | None  # in eval mode; None for an exported graph (``engine`` runs it)
    network_config: NetworkConfig
    preprocess: PreprocessConfig
    infer: InferConfig
    source: str
    fingerprint: dict[str, Any] | None = None  # the training data's (``medunet.planning.fingerprint``), if known
    engine: Engine | None = None  # where windows run (None: ``network`` in PyTorch)

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.preprocess.label_names

    @property
    def label_values(self) -> tuple[int, ...]:
        """The value written for each class index (the inverse of the training ``label_map``)."""
        return label_values(self.preprocess)

    @property
    def description(self) -> NetworkDescription:
        """What the network says about itself (stride, receptive field, costs), for planning windows."""
        return describe_network(self.network_config)

    @property
    def roi_size(self) -> tuple[int, ...]:
        return self.infer.roi_size or self.preprocess.patch_size

    def to(self, device: torch.device | str) -> SegmentationModel:
        if self.network is not None:
            self.network.to(device)
        return self

    def window_engine(self) -> Engine:
        """The engine that runs each window: ``engine``, or the PyTorch network."""
        if self.engine is not None:
            return self.engine
        assert self.network is not None
        return TorchEngine(self.network, channels_last=self.preprocess.spatial_dims == 3)


def model_from_payload(payload: dict[str, Any], source: str) -> SegmentationModel:
    """Build a model from a checkpoint payload (``medunet.io.model_file`` describes it)."""
    return model_from_file(ModelFile.from_payload(payload, source))


def model_from_file(model: ModelFile) -> SegmentationModel:
    """The network of ``model`` with its weights, in eval mode, and what inference needs around it."""
    network = model.load_into(create_network(model.network))
    fingerprint = read_fingerprint(model.fingerprint, model.source)
    return SegmentationModel(network, model.network, model.preprocess, model.infer, model.source, fingerprint)


def read_fingerprint(text: object, source: str) -> dict[str, Any] | None:
    """The training fingerprint a model carries (JSON text), or ``None`` when it has none."""
    if text is None:
        return None
    try:
        data = json.loads(text) if isinstance(text, str | bytes) else text
    except json.JSONDecodeError as exc:
        raise InputError(source, f"its training fingerprint is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(source, "its training fingerprint is not a JSON object")
    return data


DEFAULT_BUNDLE = "hippocampus_mri_3d"


def bundles_root() -> Path:
    """``bundles/`` beside the package (a checkout or editable install), or ``$MEDUNET_BUNDLES``."""
    env = os.environ.get("MEDUNET_BUNDLES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "bundles"


def default_model_path() -> Path:
    """The shipped default model, or ``$MEDUNET_DEFAULT_MODEL``."""
    env = os.environ.get("MEDUNET_DEFAULT_MODEL")
    path = Path(env) if env else bundles_root() / DEFAULT_BUNDLE
    if not path.exists():
        raise InputError(path, "no default model here; pass --model or set MEDUNET_DEFAULT_MODEL")
    return path


def load_torch_model(ref: str | Path, device: str | torch.device, tracking_uri: str | None) -> SegmentationModel:
    """A model reference that is not an exported graph, in PyTorch (``medunet.inference.loading.load_model``)."""
    if is_registry_uri(ref):
        bundle = download_registered_bundle(str(ref), tracking_uri)
        return model_from_file(ModelFile.from_payload(read_bundle_payload(bundle), str(ref))).to(device)
    path = Path(ref)
    if is_bundle(path):
        return model_from_file(read_bundle_model(path)).to(device)
    if path.is_dir():
        if not run_checkpoints(path):
            raise InputError(
                path, "folder is neither a medunet bundle, a run folder with best.pt, nor a cross-validation run"
            )
        return model_from_file(read_run_model(path)).to(device)
    if not path.exists():
        raise InputError(path, "no such model file or folder")
    return model_from_file(read_model_file(path)).to(device)
