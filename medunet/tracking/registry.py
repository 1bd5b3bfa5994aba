"""The MLflow model registry: register a run's model, list, promote with an alias.

Every call goes through an ``MlflowClient`` for the tracking URI it is given (``tracking_uri``:
``--tracking-uri``, ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``), which also serves as the registry.
MLflow's process-wide URI is set only inside ``process_tracking_uri``, for the few MLflow calls that
take no client or make their own, and restored after.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from medunet.errors import MedunetError
from medunet.io.model_uri import tracking_uri

MODEL_URI_TAG = "medunet.model_uri"  # the run tag holding the URI of the model a training run logged


class RegistryError(MedunetError):
    pass


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str


_PROCESS_URI_LOCK = threading.RLock()


@contextlib.contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI (and ``$MLFLOW_TRACKING_URI``, which MLflow sets with it) is
    ``uri`` inside the block only; what it was before is restored after. For MLflow calls that take no
    client (``mlflow.pyfunc.log_model``) or make their own ``MlflowClient()`` (a local registry store
    resolves a ``models:/m-...`` source that way when a version is created). medunet's own blocks
    take turns (a lock); MLflow offers no way to keep a host thread's fluent calls out meanwhile."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _PROCESS_URI_LOCK:
        previous = getattr(tracking_utils, "_tracking_uri", None)  # set by mlflow.set_tracking_uri; None: never set
        previous_env = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None unsets it, as MLflow itself does
            if previous_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous_env


def client_for(uri: str | None) -> Any:
    """An ``MlflowClient`` whose tracking and registry URIs are ``tracking_uri(uri)``."""
    from mlflow import MlflowClient

    resolved = tracking_uri(uri)
    return MlflowClient(tracking_uri=resolved, registry_uri=resolved)


def register_model_uri(model_uri: str, name: str, run_id: str | None = None, uri: str | None = None) -> str:
    """Register ``model_uri`` (``models:/<model id>``, as the tracker logs it) as a new version of
    ``name``; returns the version."""
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise RegistryError(f"{name}: cannot be registered at {tracking_uri(uri)} ({exc.message})") from None
    try:
        with process_tracking_uri(tracking_uri(uri)):  # a local store resolves the model with MlflowClient()
            version = client.create_model_version(
                name, model_uri, run_id=run_id, await_creation_for=30, model_id=logged_model_id(model_uri)
            )
    except MlflowException as exc:
        raise RegistryError(f"{name}: {model_uri} cannot be registered ({exc.message})") from None
    return str(version.version)


def logged_model_id(model_uri: str) -> str | None:
    """``m-...`` of ``models:/m-...`` (a logged model), else ``None``."""
    body = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else ""
    return body if body and "/" not in body and "@" not in body else None


def register_run(run_id: str, name: str, uri: str | None = None) -> str:
    """Register the model that ``medunet train`` logged in run ``run_id``."""
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(f"run {run_id}: not found at {tracking_uri(uri)} ({exc.message})") from None
    model_uri = run.data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        raise RegistryError(f"run {run_id}: holds no medunet model (did the training finish with tracking on?)")
    return register_model_uri(model_uri, name, run_id, uri)


def list_versions(uri: str | None = None) -> list[RegisteredVersion]:
    client = client_for(uri)
    out = []
    for model in client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for mv in client.search_model_versions(f"name = '{model.name}'"):
            out.append(
                RegisteredVersion(
                    model.name, str(mv.version), tuple(sorted(aliases.get(str(mv.version), []))), mv.run_id or ""
                )
            )
    return sorted(out, key=lambda v: (v.name, int(v.version)))


def promote(name: str, version: str, alias: str, uri: str | None = None) -> None:
    """Point ``alias`` (e.g. ``champion``) at ``version`` of ``name``."""
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        raise RegistryError(f"{name} version {version}: {exc.message}") from None
