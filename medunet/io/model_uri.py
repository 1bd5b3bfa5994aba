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
    """Download a registered model and return the medunet bundle inside it. The registry is the
    tracking store (``tracking_uri(tracking)``), asked through its own client: MLflow's process-wide
    URIs are left alone."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    resolved = tracking_uri(tracking)
    name, version, alias = parse_registry_uri(uri)
    client = MlflowClient(tracking_uri=resolved, registry_uri=resolved)
    try:
        if alias is not None:
            version = str(client.get_model_version_by_alias(name, alias).version)
        location = client.get_model_version_download_uri(name, version)
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=resolved, registry_uri=resolved)
        )
    except MlflowException as exc:
        raise InputError(uri, f"not found in the registry at {resolved} ({exc.message})") from None
    bundle = local / "artifacts" / "bundle"
    if not bundle.is_dir():
        raise InputError(uri, "registered model holds no medunet bundle")
    return bundle


def parse_registry_uri(uri: str) -> tuple[str, str, str | None]:
    """``(name, version, None)`` of ``models:/NAME/VERSION``, ``(name, "", alias)`` of ``models:/NAME@ALIAS``."""
    body = uri.removeprefix("models:/")
    name, at, alias = body.partition("@")
    if at and name and alias and "/" not in alias:
        return name, "", alias
    name, slash, version = body.rpartition("/")
    if not at and slash and name and version.isdigit():
        return name, version, None
    raise InputError(uri, "not a registered model's URI; expected models:/NAME/VERSION or models:/NAME@ALIAS")
