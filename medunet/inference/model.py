"""A trained model as inference needs it: network, preprocessing, labels and window."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medunet.config import InferConfig, NetworkConfig, PreprocessConfig, from_dict
from medunet.errors import InputError
from medunet.io import load_checkpoint
from medunet.networks import create_network


@dataclass(frozen=True)
class SegmentationModel:
    network: nn.Module  # in eval mode
    network_config: NetworkConfig
    preprocess: PreprocessConfig
    infer: InferConfig
    source: str

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.preprocess.label_names

    @property
    def label_values(self) -> tuple[int, ...]:
        """The value written for each class index (the inverse of the training ``label_map``)."""
        mapping = {index: value for value, index in self.preprocess.label_map}
        return tuple(mapping.get(i, i) for i in range(self.preprocess.num_classes))

    @property
    def roi_size(self) -> tuple[int, ...]:
        return self.infer.roi_size or self.preprocess.patch_size

    def to(self, device: torch.device | str) -> SegmentationModel:
        self.network.to(device)
        return self


def model_from_payload(payload: dict[str, Any], source: str) -> SegmentationModel:
    """Build a model from a checkpoint payload (see ``medunet.training.loop.model_payload``)."""
    try:
        net_cfg = from_dict(NetworkConfig, payload["network"], where=f"{source}:network")
        pre = from_dict(PreprocessConfig, payload["preprocess"], where=f"{source}:preprocess")
        inf = from_dict(InferConfig, payload.get("infer", {}), where=f"{source}:infer")
        network = create_network(net_cfg)
        network.load_state_dict({k: v.float() for k, v in payload["state_dict"].items()})
    except KeyError as exc:
        raise InputError(source, f"checkpoint lacks {exc}; is it a medunet checkpoint?") from None
    except RuntimeError as exc:
        raise InputError(source, f"weights do not fit the network ({str(exc).splitlines()[0]})") from None
    network.eval()
    return SegmentationModel(network, net_cfg, pre, inf, source)


def load_model(ref: str | Path, device: str | torch.device = "cpu") -> SegmentationModel:
    """Load a model from a checkpoint file (``best.pt``) — no code is executed while loading."""
    path = Path(ref)
    if path.is_dir():
        for candidate in (path / "best.pt", path / "models" / "model.pt"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise InputError(path, "folder holds neither best.pt nor models/model.pt")
    model = model_from_payload(load_checkpoint(path), str(path))
    return model.to(device)
