"""MLflow tracking for ``medunet train``: params, per-epoch metrics, artifacts, the model.

By default runs go to an embedded SQLite store (``./mlflow.db``) with artifacts in ``./mlruns/``;
``--tracking-uri`` or ``$MLFLOW_TRACKING_URI`` points at a tracking server. A server that is down at
the start stops the command before training; one that goes away during training does not: the
metrics are kept in ``<run>/tracking_backlog.jsonl`` and sent once it is back (tried again each
minute, and when the run ends). How long one call waits for a server is MLflow's
``MLFLOW_HTTP_REQUEST_*`` settings: the ``medunet`` command shortens them to seconds
(``medunet.runtime.shorten_mlflow_retries``); a host application keeps its own.
Only case ids and the config reach MLflow, never image headers (so no DICOM patient tags).

The tracker talks to its server through its own ``MlflowClient``; MLflow's process-wide tracking URI
is set only while the model is logged (``mlflow.pyfunc.log_model`` has no client), and restored.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from medunet import __version__
from medunet.config import ExperimentConfig, to_dict
from medunet.errors import MedunetError
from medunet.io.model_uri import DEFAULT_ARTIFACTS, tracking_uri
from medunet.io.writers import write_text
from medunet.tracking.registry import MODEL_URI_TAG, client_for, process_tracking_uri, register_model_uri

log = logging.getLogger(__name__)
T = TypeVar("T")


class TrackingError(MedunetError):
    """The tracking server cannot be used."""


@dataclass(frozen=True)
class TrackingRequest:
    config: ExperimentConfig
    run_dir: Path
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI or the embedded SQLite store
    experiment: str | None = None  # default: the config's name
    register_as: str | None = None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | tuple) else str(v)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class RunTracker:
    """One MLflow run; every call survives the server going away (see the module docstring).

    After a failed call, metrics go to the backlog; the next epoch at least ``RETRY_SECONDS`` later
    tries the server again and, if it is back, sends the backlog first, in order.
    """

    RETRY_SECONDS = 60.0

    def __init__(self, req: TrackingRequest) -> None:
        self.req = req
        self.uri = tracking_uri(req.uri)
        self.client = client_for(self.uri)
        self.backlog = req.run_dir / "tracking_backlog.jsonl"
        self.online = True
        self.offline_since = 0.0  # time.monotonic() of the last failed call
        self.in_outage = False  # warned already: retries that fail stay quiet
        name = req.experiment or req.config.name
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                location = None
                if self.uri.startswith("sqlite:"):
                    location = (Path(DEFAULT_ARTIFACTS).resolve()).as_uri()
                exp_id = self.client.create_experiment(name, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            manifest = req.config.data.manifest
            tags = {
                "medunet.version": __version__,
                "medunet.git_commit": _git_commit(),
                "medunet.manifest": manifest.name,
                "medunet.manifest_sha256": _sha256(manifest) if manifest.is_file() else "missing",
            }
            self.run = self.client.create_run(exp_id, run_name=req.run_dir.name, tags=tags)
            params = flatten(to_dict(req.config))
            items = list(params.items())
            for i in range(0, len(items), 90):
                self.client.log_batch(self.run.info.run_id, params=[_param(k, v) for k, v in items[i : i + 90]])
        except Exception as exc:  # connection errors come in many types
            raise TrackingError(
                f"tracking at {self.uri} is unreachable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                "start the server, point --tracking-uri elsewhere, or train with --no-tracking"
            ) from None
        self.run_id = self.run.info.run_id
        log.info("tracking run %s at %s", self.run_id, self.uri)

    def log_epoch(self, record: dict[str, Any]) -> None:
        metrics = {k: float(v) for k, v in record.items() if k != "epoch" and isinstance(v, int | float)}
        entry = {"step": int(record["epoch"]), "timestamp": _now_ms(), "metrics": metrics}
        if not self.online and time.monotonic() - self.offline_since >= self.RETRY_SECONDS:
            self.online = True  # try again: the server may be back
        if self.online:
            self._flush_backlog()
        if self.online and self._try(functools.partial(self._send, entry)):
            return
        with self.backlog.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is left (backlog, artifacts, model) and close the run."""
        self.online = True  # one more try: the server may be back
        self._flush_backlog()
        if status == "FINISHED" and self.online:
            self._try(self._log_outputs)
        if self.online:
            self._try(lambda: self.client.set_terminated(self.run_id, status))
        if not self.online:
            log.warning("tracking server %s is unreachable: the run's metrics are kept in %s", self.uri, self.backlog)

    def _send(self, entry: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        # the epoch's own timestamp, also when sent late: a resent batch repeats the same rows
        step, stamp = entry["step"], entry.get("timestamp", _now_ms())
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in entry["metrics"].items()])

    def _flush_backlog(self) -> None:
        if not self.backlog.exists():
            return
        entries = [json.loads(line) for line in self.backlog.read_text().splitlines() if line]
        for i, entry in enumerate(entries):
            if not self._try(functools.partial(self._send, entry)):
                if i:  # keep only what was not sent
                    write_text(self.backlog, "".join(json.dumps(e) + "\n" for e in entries[i:]))
                return
        self.backlog.unlink()
        self.in_outage = False
        log.warning("tracking server %s is back: sent %d kept epochs", self.uri, len(entries))

    def _try(self, fn: Callable[[], T]) -> bool:
        try:
            fn()
        except Exception as exc:
            if not self.in_outage:
                log.warning(
                    "tracking server %s went away (%s: %s); training goes on, metrics are kept in %s",
                    self.uri,
                    type(exc).__name__,
                    str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "",
                    self.backlog,
                )
            self.online, self.in_outage = False, True
            self.offline_since = time.monotonic()
            return False
        return True

    def _log_outputs(self) -> None:
        import mlflow

        run_dir = self.req.run_dir
        for name in ("config.yaml", "split.json", "history.json"):
            if (run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        with tempfile.TemporaryDirectory() as tmp:
            pictures = Path(tmp) / "pictures"
            make_pictures(self.req.config, run_dir, pictures)
            self.client.log_artifacts(self.run_id, str(pictures), "pictures")
            from medunet.bundle import ModelCard, build_bundle

            # the folder's name is what the pyfunc model keeps under artifacts/: "bundle"
            bundle = build_bundle(run_dir, Path(tmp) / "bundle", ModelCard(task=self.req.config.name))
            self.client.log_artifacts(self.run_id, str(bundle), "bundle")
            from medunet.tracking.pyfunc import MedunetPyfunc

            with _active_run(self.run_id, self.uri):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=MedunetPyfunc(),
                    artifacts={"bundle": str(bundle)},
                    pip_requirements=[f"medunet=={__version__}"],
                )
        self.client.set_tag(self.run_id, MODEL_URI_TAG, info.model_uri)
        if self.req.register_as:
            version = register_model_uri(info.model_uri, self.req.register_as, self.run_id, self.uri)
            log.info("registered %s version %s", self.req.register_as, version)


def make_pictures(cfg: ExperimentConfig, run_dir: Path, out: Path, n_cases: int = 3) -> list[Path]:
    """Training curve and QC pictures (mask over scan) of the first validation cases."""
    from medunet.data import read_manifest
    from medunet.evaluation.pictures import qc_picture, training_curve
    from medunet.inference import load_model, segment
    from medunet.io import load_image

    out.mkdir(parents=True, exist_ok=True)
    written = [training_curve(json.loads((run_dir / "history.json").read_text()), out / "training_curve.png")]
    val_ids = json.loads((run_dir / "split.json").read_text())["val"][:n_cases]
    cases = {c.case_id: c for c in read_manifest(cfg.data.manifest)}
    model = load_model(run_dir / "best.pt")
    for case_id in val_ids:
        case = cases[case_id]
        dims = 3 if case.slice_index is not None else cfg.preprocess.spatial_dims
        image = load_image(list(case.images), spatial_dims=dims, channels_in_file=len(cfg.preprocess.channels))
        seg = segment(image, model)
        written.append(
            qc_picture(
                image[0].numpy(),
                seg.labels.numpy(),
                cfg.preprocess.label_names,
                out / f"qc_{case.volume_id}.png",
                title=f"{case.volume_id} (validation)",
            )
        )
    return written


@contextlib.contextmanager
def _active_run(run_id: str, uri: str) -> Iterator[None]:
    """``run_id`` as MLflow's active run at ``uri``, for MLflow's calls that take no client; the
    process-wide URI is ``uri`` inside the block only (``registry.process_tracking_uri``)."""
    import mlflow

    with process_tracking_uri(uri), mlflow.start_run(run_id=run_id):
        yield


def _param(key: str, value: str) -> Any:
    from mlflow.entities import Param

    return Param(key, value[:6000])


def _now_ms() -> int:
    return int(time.time() * 1000)
