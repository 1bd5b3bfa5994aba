"""``models:/NAME/VERSION`` and ``models:/NAME@ALIAS``: registry URIs resolved to a local bundle folder."""

from __future__ import annotations

import os
from pathlib import Path

from medunet.errors import InputError

DEFAULT_TRACKING_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"


def is_registry_uri(ref: str | Path) -> bool:
    return str(ref).startswith("models:/")


def tracking_uri(explicit: str | None = None) -> str:
    """``explicit`` (``--tracking-uri``), else ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db`` (SQLite)."""
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(DEFAULT_TRACKING_DB).resolve()}"


def download_registered_bundle(uri: str, tracking: str | None = None) -> Path:
    """Download a registered model and return the medunet bundle inside it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri(tracking))
    mlflow.set_registry_uri(tracking_uri(tracking))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as exc:
        raise InputError(uri, f"not found in the registry at {tracking_uri(tracking)} ({exc.message})") from None
    bundle = local / "artifacts" / "bundle"
    if not bundle.is_dir():
        raise InputError(uri, "registered model holds no medunet bundle")
    return bundle
