"""What an exported graph carries besides the graph: one JSON object under the ``medunet`` key (ONNX
``metadata_props``, OpenVINO ``rt_info``, TorchScript ``extra_files``). ``medunet.inference.export``
writes it and reads it back through every runtime; here is the format and the ONNX reader that needs
only the ``onnx`` package (``medunet bundle verify`` checks a bundle's ``models/model.onnx`` with it).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from medunet.errors import InputError

EXPORT_FORMAT = "medunet-export/1"
METADATA_KEY = "medunet"


def parse_metadata(text: str | None, path: Path) -> dict[str, Any]:
    """The metadata of the exported graph at ``path`` from its ``medunet`` entry (``None``: it has none)."""
    if text is None:
        raise InputError(path, "has no medunet metadata; export it with `medunet export`")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"its medunet metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise InputError(path, f"its metadata is not {EXPORT_FORMAT}")
    return meta


def can_read_onnx() -> bool:
    return importlib.util.find_spec("onnx") is not None


def onnx_metadata_text(path: Path) -> str | None:
    """The ``medunet`` entry of an ONNX file's ``metadata_props`` (the graph's weights are not read)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)


def read_onnx_metadata(path: Path) -> dict[str, Any]:
    """The metadata of an exported ONNX file; needs the ``onnx`` package (``can_read_onnx``)."""
    try:
        text = onnx_metadata_text(path)
    except Exception as exc:  # a damaged or foreign file: onnx raises its own types
        raise InputError(path, f"cannot be read as an exported model ({type(exc).__name__}: {exc})") from None
    return parse_metadata(text, path)
