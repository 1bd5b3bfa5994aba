"""Checkpoint files: written atomically, read without executing code (``weights_only=True``).

A checkpoint that medunet writes is a dict with ``format: "medunet-checkpoint/N"``; reading one
written by a newer medunet (a larger ``N``) is refused with one line naming the file, rather than
misread. Files without ``format`` (a bundle's ``models/model.pt``, a bare state dict, checkpoints
from before the version was written) read as they always did. What the dict holds is
``medunet.io.model_file``'s business.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from medunet import __version__
from medunet.errors import InputError
from medunet.io.writers import atomic_path

CHECKPOINT_FORMAT_NAME = "medunet-checkpoint"
CHECKPOINT_VERSION = 1  # raise when the payload changes in a way an older medunet would misread
CHECKPOINT_FORMAT = f"{CHECKPOINT_FORMAT_NAME}/{CHECKPOINT_VERSION}"


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


def checkpoint_version(payload: dict[str, Any], source: str | Path) -> int:
    """The format version ``payload`` was written in: 0 when it names none, refused (``InputError``)
    when it is not a medunet checkpoint's or newer than this medunet reads."""
    if "format" not in payload:
        return 0
    fmt = payload["format"]
    name, _, version = fmt.partition("/") if isinstance(fmt, str) else ("", "", "")
    if name != CHECKPOINT_FORMAT_NAME or not version.isdigit():
        raise InputError(source, f"not a medunet checkpoint (its format is {fmt!r}, not {CHECKPOINT_FORMAT!r})")
    if int(version) > CHECKPOINT_VERSION:
        raise InputError(
            source,
            f"written in checkpoint format {fmt}, newer than this medunet ({__version__}) reads "
            f"({CHECKPOINT_FORMAT}); upgrade medunet to load it",
        )
    return int(version)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, no pickled code.
    Its format version is checked (``checkpoint_version``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(path, load_failure(exc)) from None
    if not isinstance(payload, dict):
        raise InputError(path, "not a medunet checkpoint (expected a dict)")
    checkpoint_version(payload, path)
    return payload
