"""Offline checks of a medunet bundle: files, metadata, network in/out, weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from medunet.errors import InputError, MedunetError
from medunet.io import bundle_layout as layout
from medunet.io.export_metadata import can_read_onnx, read_onnx_metadata
from medunet.io.model_file import ModelFile
from medunet.networks import create_network


@dataclass(frozen=True)
class BundleInfo:
    name: str
    path: Path
    version: str
    task: str


def schema() -> dict[str, Any]:
    """medunet's offline copy of the metadata requirements (see ``meta_schema.json``)."""
    return json.loads(resources.files("medunet.bundle").joinpath("meta_schema.json").read_text())


def schema_path() -> Path:
    return Path(str(resources.files("medunet.bundle").joinpath("meta_schema.json")))


def verify_bundle(path: Path) -> list[str]:
    """Problems found in the bundle at ``path`` (empty when it is sound). Executes no bundle code."""
    problems = [f"missing {f}" for f in layout.REQUIRED_FILES if not (path / f).is_file()]
    if problems:
        return problems
    meta = layout.read_json(path / layout.METADATA)
    import jsonschema

    validator = jsonschema.Draft7Validator(schema())
    problems += [
        f"metadata: {'/'.join(map(str, e.path)) or 'top level'}: {e.message}" for e in validator.iter_errors(meta)
    ]
    if problems:
        return problems
    try:
        model = layout.read_bundle_model(path)
        network = model.load_into(create_network(model.network))
    except MedunetError as exc:
        return [str(exc)]
    fmt = meta["network_data_format"]
    inp, out = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    shape = [int(s) for s in inp["spatial_shape"]]
    if model.network.in_channels != inp["num_channels"]:
        problems.append(f"metadata says {inp['num_channels']} input channels, network has {model.network.in_channels}")
    if len(model.preprocess.label_names) != out["num_channels"]:
        problems.append(
            f"metadata says {out['num_channels']} output channels, labels are {model.preprocess.label_names}"
        )
    with torch.no_grad():
        y = network(torch.zeros(1, inp["num_channels"], *shape))
    if tuple(y.shape) != (1, out["num_channels"], *[int(s) for s in out["spatial_shape"]]):
        problems.append(f"network maps {shape} to {tuple(y.shape)}, not what metadata says")
    return problems + onnx_problems(path, model)


def onnx_problems(path: Path, model: ModelFile) -> list[str]:
    """A bundle's ``models/model.onnx`` (optional) must be the same model: network, labels, preprocessing."""
    graph = path / "models" / "model.onnx"
    if not graph.is_file() or not can_read_onnx():  # without onnx the graph cannot be read, and is not needed
        return []
    try:
        meta = json.loads(json.dumps(read_onnx_metadata(graph)))
    except MedunetError as exc:
        return [str(exc)]
    problems = []
    ours = {
        "network": dataclasses.asdict(model.network),
        "preprocess": dataclasses.asdict(model.preprocess),
        "label_values": list(model.label_values),
    }
    for key, value in json.loads(json.dumps(ours)).items():
        if meta.get(key) != value:
            problems.append(f"models/model.onnx: its {key} differs from the bundle's; export it again")
    return problems


def list_bundles(root: Path) -> list[BundleInfo]:
    """The bundles installed under ``root`` (one folder each)."""
    found = []
    for folder in (
        sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    ):
        if not (folder / layout.METADATA).is_file():
            continue
        try:
            meta = layout.read_json(folder / layout.METADATA)
        except InputError:
            continue
        found.append(BundleInfo(folder.name, folder, str(meta.get("version", "?")), str(meta.get("task", ""))))
    return found
