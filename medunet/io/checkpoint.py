"""Checkpoint files: written atomically, read without executing code (``weights_only=True``)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from medunet.errors import InputError
from medunet.io.writers import atomic_path


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Save ``payload`` to ``path`` through a temporary file, so a kill never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_failure(exc: BaseException) -> str:
    """``torch.load``'s failure in one phrase; a file that would run code when unpickled says which code."""
    text = str(exc)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        what = f" ({refused.group(1)})" if refused else ""
        return f"refused: it holds Python objects that would run code when loaded{what}; medunet loads weights only"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"not a loadable medunet checkpoint ({type(exc).__name__}: {first})"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, no pickled code."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(path, load_failure(exc)) from None
    if not isinstance(payload, dict):
        raise InputError(path, "not a medunet checkpoint (expected a dict)")
    return payload
