"""The MLflow model registry: register a run's model, list, promote with an alias."""

from __future__ import annotations

from dataclasses import dataclass

from medunet.errors import MedunetError
from medunet.io.model_uri import tracking_uri


class RegistryError(MedunetError):
    pass


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str


def _client(uri: str | None):  # type: ignore[no-untyped-def]
    import mlflow
    from mlflow import MlflowClient

    resolved = tracking_uri(uri)
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    return MlflowClient(resolved, resolved)


def register_model_uri(model_uri: str, name: str, run_id: str | None = None, uri: str | None = None) -> str:
    """Register ``model_uri`` as a new version of ``name``; returns the version."""
    import mlflow

    _client(uri)
    version = mlflow.register_model(model_uri, name, await_registration_for=30)
    return str(version.version)


def register_run(run_id: str, name: str, uri: str | None = None) -> str:
    """Register the model that ``medunet train`` logged in run ``run_id``."""
    from mlflow.exceptions import MlflowException

    from medunet.tracking.tracker import MODEL_URI_TAG

    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(f"run {run_id}: not found at {tracking_uri(uri)} ({exc.message})") from None
    model_uri = run.data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        raise RegistryError(f"run {run_id}: holds no medunet model (did the training finish with tracking on?)")
    return register_model_uri(model_uri, name, run_id, uri)


def list_versions(uri: str | None = None) -> list[RegisteredVersion]:
    client = _client(uri)
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

    client = _client(uri)
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        raise RegistryError(f"{name} version {version}: {exc.message}") from None
