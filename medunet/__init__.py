"""medunet: train 2D and 3D U-Nets on medical images and segment new scans (built on MONAI).

``load_model`` and ``segment`` are the Python entry points; they import torch and MONAI on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model", "segment"]

if TYPE_CHECKING:
    from medunet.inference import load_model, segment


def __getattr__(name: str) -> Any:
    if name in ("load_model", "segment"):
        from medunet import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'medunet' has no attribute {name!r}")
