"""A trained model as its file holds it: network, preprocessing and labels, window, weights, fingerprint.

A run's ``best.pt`` is this payload (``last.pt`` adds what resuming needs; planning may add its
post-processing choice to ``infer``)::

    {"format": "medunet-checkpoint/1",          # checked on load (medunet.io.checkpoint)
     "network": {...},                          # NetworkConfig
     "preprocess": {...},                       # PreprocessConfig: channels, labels, normalization, patch
     "infer": {...},                            # InferConfig: window, overlap, TTA
     "state_dict": {name: tensor},
     "fingerprint": "<JSON text>"}              # optional: the training data's (medunet.planning.fingerprint)

The folds of a cross-validation run make one such model: ``network.ensemble = K``, fold ``i``'s
weights under ``members.i.``. A bundle keeps the same parts in ``configs/inference.json`` and
``models/model.pt`` (``medunet.io.bundle_layout.read_bundle_model``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medunet.config import InferConfig, NetworkConfig, PreprocessConfig, from_dict, to_dict
from medunet.errors import InputError
from medunet.io.checkpoint import CHECKPOINT_FORMAT, checkpoint_version, load_checkpoint
from medunet.io.run_layout import BEST, fold_checkpoints


@dataclass(frozen=True)
class ModelFile:
    """What inference needs of a trained model, and nothing else (see the module docstring)."""

    network: NetworkConfig
    preprocess: PreprocessConfig
    infer: InferConfig
    state_dict: dict[str, torch.Tensor]
    fingerprint: str | None = None  # the training data's fingerprint as JSON text, when the run was planned
    source: str = ""  # where it was read from, for messages

    @classmethod
    def from_payload(cls, payload: dict[str, Any], source: str) -> ModelFile:
        """The model in a loaded checkpoint ``payload``; ``source`` names it in errors."""
        checkpoint_version(payload, source)
        try:
            network = from_dict(NetworkConfig, payload["network"], where=f"{source}:network")
            preprocess = from_dict(PreprocessConfig, payload["preprocess"], where=f"{source}:preprocess")
            state_dict = payload["state_dict"]
        except KeyError as exc:
            raise InputError(source, f"checkpoint lacks {exc}; is it a medunet checkpoint?") from None
        if not isinstance(state_dict, dict):
            raise InputError(source, "its state_dict is not a mapping of names to tensors")
        infer = from_dict(InferConfig, payload.get("infer", {}), where=f"{source}:infer")
        fingerprint = _fingerprint_text(payload.get("fingerprint"), source)
        return cls(network, preprocess, infer, state_dict, fingerprint, source)

    def to_payload(self) -> dict[str, Any]:
        """The checkpoint payload, with this medunet's format version (``save_checkpoint`` writes it)."""
        return {
            **({"fingerprint": self.fingerprint} if self.fingerprint is not None else {}),
            "format": CHECKPOINT_FORMAT,
            "network": to_dict(self.network),
            "preprocess": to_dict(self.preprocess),
            "infer": to_dict(self.infer),
            "state_dict": dict(self.state_dict),
        }

    @property
    def label_values(self) -> tuple[int, ...]:
        return label_values(self.preprocess)

    def load_into(self, network: nn.Module) -> nn.Module:
        """``network`` (made from ``self.network``) with these weights in float32, in eval mode."""
        try:
            network.load_state_dict({k: v.float() for k, v in self.state_dict.items()})
        except RuntimeError as exc:
            raise InputError(self.source, f"weights do not fit the network ({str(exc).splitlines()[0]})") from None
        return network.eval()


def label_values(preprocess: PreprocessConfig) -> tuple[int, ...]:
    """The value written for each class index (the inverse of the training ``label_map``)."""
    mapping = {index: value for value, index in preprocess.label_map}
    return tuple(mapping.get(i, i) for i in range(preprocess.num_classes))


def _fingerprint_text(value: object, source: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, dict):
        return json.dumps(value)
    raise InputError(source, f"its training fingerprint is a {type(value).__name__}, not JSON text")


def read_model_file(path: str | Path) -> ModelFile:
    """The model in a checkpoint file (``best.pt``, ``last.pt``), read with ``weights_only``."""
    return ModelFile.from_payload(load_checkpoint(path), str(path))


def ensemble(members: Sequence[ModelFile], source: str) -> ModelFile:
    """One model whose network averages the probabilities of ``members`` (the folds of one recipe:
    same network and preprocessing); one member is that model itself."""
    first = members[0]
    if len(members) == 1:
        return dataclasses.replace(first, source=source)
    for member in members[1:]:
        for key in ("network", "preprocess"):
            if getattr(member, key) != getattr(first, key):
                raise InputError(member.source, f"its {key} differs from {first.source}'s; folds must share one recipe")
    state = {f"members.{i}.{k}": v for i, m in enumerate(members) for k, v in m.state_dict.items()}
    network = dataclasses.replace(first.network, ensemble=len(members))
    return dataclasses.replace(first, network=network, state_dict=state, source=source)


def ensemble_payload(payloads: list[dict[str, Any]], sources: list[str]) -> dict[str, Any]:
    """``ensemble`` of checkpoint payloads, as a payload."""
    members = [ModelFile.from_payload(p, s) for p, s in zip(payloads, sources, strict=True)]
    return ensemble(members, sources[0]).to_payload()


def run_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints a run folder's model is made of: its ``best.pt``, else its folds' (a
    cross-validation run, in fold order), else none."""
    best = folder / BEST
    return [best] if best.is_file() else fold_checkpoints(folder)


def read_run_model(folder: Path) -> ModelFile:
    """The model of a run folder: its ``best.pt``, or the ensemble of its folds' ``fold_k/best.pt``."""
    checkpoints = run_checkpoints(folder)
    if not checkpoints:
        raise InputError(folder, f"holds neither {BEST} nor the fold_k/{BEST} of a cross-validation run")
    if checkpoints == [folder / BEST]:
        return read_model_file(checkpoints[0])
    return ensemble([read_model_file(p) for p in checkpoints], str(folder))
