"""MLflow tracking and model registry."""

from medunet.tracking.registry import RegistryError, list_versions, promote, register_run
from medunet.tracking.tracker import RunTracker, TrackingError, TrackingRequest

__all__ = [
    "RegistryError",
    "RunTracker",
    "TrackingError",
    "TrackingRequest",
    "list_versions",
    "promote",
    "register_run",
]
