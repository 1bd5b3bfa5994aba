"""The files of a medunet MONAI bundle, and reading them as plain data (no code is executed).

A bundle's ``configs/inference.json`` is a MONAI config: ``python -m monai.bundle run`` parses it
and instantiates its ``_target_`` components, which runs code. medunet itself never does that: it
reads the JSON as data, accepts only its own component names, and loads ``models/model.pt`` with
``weights_only=True``. A bundle that is not a medunet bundle is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medunet.errors import InputError
from medunet.io.checkpoint import load_checkpoint
from medunet.io.model_file import ModelFile

METADATA = Path("configs/metadata.json")
INFERENCE = Path("configs/inference.json")
TRAIN = Path("configs/train.json")
EVALUATE = Path("configs/evaluate.json")
WEIGHTS = Path("models/model.pt")
README = Path("docs/README.md")
LICENSE = Path("LICENSE")
RECIPE = Path("configs/recipe.yaml")
FINGERPRINT = Path("configs/fingerprint.json")  # the training data's fingerprint (planned models)
PLAN = Path("configs/plan.yaml")  # the plan the recipe came from, every choice with its reason
REQUIRED_FILES = (METADATA, INFERENCE, TRAIN, EVALUATE, WEIGHTS, README, LICENSE)

NETWORK_TARGET = "medunet.bundle.components.network"
SEGMENTER_TARGET = "medunet.bundle.components.FolderSegmenter"


def is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / INFERENCE).is_file() and (path / WEIGHTS).is_file()


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "missing") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(path, "expected a JSON object")
    return data


def read_bundle_payload(folder: Path) -> dict[str, Any]:
    """The checkpoint-style payload (network, preprocess, infer, state_dict) of a medunet bundle.

    ``models/model.pt`` is a bare state dict, as MONAI's bundles keep it (``{"state_dict": ...}`` is
    read too); the bundle's configs say what it is the weights of.
    """
    config = read_json(folder / INFERENCE)
    net = config.get("network_def")
    segmenter = config.get("segmenter")
    if not isinstance(net, dict) or net.get("_target_") != NETWORK_TARGET:
        raise InputError(
            folder,
            "not a medunet bundle (its network_def is not medunet's); medunet does not run other bundles' code — "
            "use `python -m monai.bundle run` only with bundles you trust",
        )
    if not isinstance(segmenter, dict) or segmenter.get("_target_") != SEGMENTER_TARGET:
        raise InputError(folder / INFERENCE, "lacks medunet's segmenter section (preprocess and window)")
    network = {k: v for k, v in net.items() if not k.startswith("_")}
    weights = load_checkpoint(folder / WEIGHTS)
    state_dict = weights.get("state_dict", weights)
    payload = {
        "network": network,
        "preprocess": segmenter.get("preprocess", {}),
        "infer": segmenter.get("infer", {}),
        "state_dict": state_dict,
    }
    if (folder / FINGERPRINT).is_file():  # the training data's fingerprint, kept as text like a checkpoint's
        payload["fingerprint"] = (folder / FINGERPRINT).read_text()
    return payload


def read_bundle_model(folder: Path) -> ModelFile:
    """The model of a medunet bundle (``read_bundle_payload``, typed)."""
    return ModelFile.from_payload(read_bundle_payload(folder), str(folder))
