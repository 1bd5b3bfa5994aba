"""Tracking and registry against real MLflow: the embedded SQLite store and a server on loopback."""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import nibabel as nib
import numpy as np
import pytest
from mlflow import MlflowClient

from medunet.config import load_config
from medunet.runtime import MLFLOW_HTTP_DEFAULTS
from medunet.tracking import RunTracker, TrackingRequest
from medunet.training import TrainRequest, train
from tests.conftest import make_blob_case
from tests.tracking.conftest import Server, free_port, wait_http


def medunet(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | (env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "medunet", *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=900
    )
    return proc


def check_run(client: MlflowClient, run_id: str) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert json.loads(run.data.params["network.features"]) == [8, 16, 32]
    assert {"medunet.version", "medunet.git_commit", "medunet.manifest_sha256"} <= set(run.data.tags)
    assert [m.step for m in client.get_metric_history(run_id, "dice_one")] == [1, 2]
    assert len(client.get_metric_history(run_id, "lr")) == 2
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "split.json", "pictures", "bundle"} <= top
    pictures = {a.path for a in client.list_artifacts(run_id, "pictures")}
    assert "pictures/training_curve.png" in pictures and any(p.startswith("pictures/qc_") for p in pictures)
    split = json.loads(Path(client.download_artifacts(run_id, "split.json")).read_text())
    assert set(split) == {"train", "val"} and all(c.startswith("c") for c in split["val"])  # case ids only


@pytest.mark.slow
def test_embedded_store_register_promote_infer(tiny_config: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    proc = medunet(
        "train", "--config", str(tiny_config), "--output", "run", "--epochs", "2", "--register", "blobs", "-q", cwd=work
    )
    assert proc.returncode == 0, proc.stderr
    assert (work / "mlflow.db").is_file() and (work / "mlruns").is_dir()
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run_id = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])[0].info.run_id
    check_run(client, run_id)

    assert medunet("registry", "register", run_id, "blobs", cwd=work).returncode == 0  # a second version
    promoted = medunet("registry", "promote", "blobs", "2", "--alias", "champion", cwd=work)
    assert promoted.returncode == 0, promoted.stderr
    listing = medunet("registry", "list", cwd=work).stdout.splitlines()
    assert listing[0].startswith("blobs\t1\t-") and listing[1].startswith("blobs\t2\tchampion")

    img, _ = make_blob_case(tmp_path, "scan", seed=4)
    for ref in ("models:/blobs@champion", "models:/blobs/1"):
        out = tmp_path / f"mask_{ref[-1]}.nii.gz"
        proc = medunet("infer", str(img), "-o", str(out), "--model", ref, "-q", cwd=work)
        assert proc.returncode == 0, proc.stderr
        assert nib.load(out).shape == nib.load(img).shape
    missing = medunet("infer", str(img), "-o", str(tmp_path / "x.nii.gz"), "--model", "models:/nope@champion", cwd=work)
    assert missing.returncode == 1 and "models:/nope@champion: not found in the registry" in missing.stderr


@pytest.mark.slow
def test_registering_into_a_store_named_by_tracking_uri(tiny_config: Path, tmp_path: Path) -> None:
    """A local store named with --tracking-uri (not ./mlflow.db): MLflow's local registry looks the
    logged model up through the process-wide URI, which medunet sets to that store for the call."""
    work, store = tmp_path / "work", tmp_path / "elsewhere" / "store.db"
    work.mkdir()
    store.parent.mkdir()
    uri = f"sqlite:///{store}"
    proc = medunet(
        "train", "--config", str(tiny_config), "--output", "run", "--epochs", "1", "--tracking-uri", uri,
        "--register", "blobs", "-q", cwd=work,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not (work / "mlflow.db").exists()
    client = MlflowClient(uri)
    run_id = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])[0].info.run_id
    again = medunet("registry", "register", run_id, "blobs", "--tracking-uri", uri, cwd=work)
    assert again.returncode == 0, again.stderr
    assert sorted(int(v.version) for v in client.search_model_versions("name='blobs'")) == [1, 2]
    assert not (work / "mlflow.db").exists()


@pytest.mark.slow
def test_tracking_server_and_serving(tiny_config: Path, tmp_path: Path, mlflow_server: Server) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    proc = medunet(
        "train",
        "--config",
        str(tiny_config),
        "--output",
        "run",
        "--epochs",
        "2",
        "--register",
        "blobs",
        "-q",
        cwd=work,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert not (work / "mlflow.db").exists()  # everything went to the server
    client = MlflowClient(mlflow_server.uri)
    run_id = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])[0].info.run_id
    check_run(client, run_id)
    assert medunet("registry", "promote", "blobs", "1", cwd=work, env=env).returncode == 0

    port = free_port()
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/blobs@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        # `mlflow models serve` execs `uvicorn` from PATH, as in an activated venv
        env={**os.environ, **env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, serve)
        scans = [make_blob_case(tmp_path, f"served{k}", seed=6 + k)[0] for k in range(3)]

        def ask(img: Path) -> dict:
            body = json.dumps({"dataframe_records": [{"image": base64.b64encode(img.read_bytes()).decode()}]})
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=300) as response:
                return json.loads(response.read())["predictions"][0]  # type: ignore[no-any-return]

        img = scans[0]
        answer = ask(img)
        mask = tmp_path / "served_mask.nii.gz"
        mask.write_bytes(base64.b64decode(answer["mask"]))
        assert nib.load(mask).shape == nib.load(img).shape
        np.testing.assert_allclose(nib.load(mask).affine, nib.load(img).affine)
        assert json.loads(answer["shape"]) == list(nib.load(img).shape)

        def labels(answer: dict) -> np.ndarray:
            return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(answer["mask"]))).dataobj)

        # several requests at once (the server runs them in threads) get the masks they get alone
        alone = [labels(ask(scan)) for scan in scans]
        with ThreadPoolExecutor(max_workers=6) as pool:
            together = list(pool.map(ask, scans * 2))
        for k, answer in enumerate(together):
            np.testing.assert_array_equal(labels(answer), alone[k % 3])
    finally:
        serve.terminate()
        serve.wait(timeout=30)


@pytest.mark.slow
def test_unreachable_server_stops_before_training(tiny_config: Path, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    proc = medunet(
        "train", "--config", str(tiny_config), "--output", str(tmp_path / "run"), "--tracking-uri", uri, cwd=tmp_path
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("medunet: error")]
    assert len(lines) == 1 and f"tracking at {uri} is unreachable" in lines[0] and "--no-tracking" in lines[0]
    assert not (tmp_path / "run" / "last.pt").exists()
    offline = medunet(
        "train",
        "--config",
        str(tiny_config),
        "--output",
        str(tmp_path / "run"),
        "--tracking-uri",
        uri,
        "--no-tracking",
        "--epochs",
        "1",
        "-q",
        cwd=tmp_path,
    )
    assert offline.returncode == 0, offline.stderr


def three_epoch_run(tiny_config: Path, tmp_path: Path, server: Server) -> tuple[Any, Path, RunTracker]:
    cfg = load_config(tiny_config, {"train.epochs": 3})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return cfg, run_dir, RunTracker(TrackingRequest(cfg, run_dir, server.uri))


def same_address(server: Server) -> Server:
    """A new server process on the same store and port (started by the caller)."""
    revived = Server(server.root)
    revived.port, revived.uri = server.port, server.uri
    return revived


def mlflow_settings() -> tuple[dict[str, str], str]:
    """MLflow's process-wide settings: its environment variables (not its own ``_MLFLOW_*`` telemetry
    ones) and the tracking URI."""
    return {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}, mlflow.get_tracking_uri()


@pytest.mark.slow
def test_the_tracker_changes_no_environment_variable_nor_mlflow_uri(
    tiny_config: Path, tmp_path: Path, mlflow_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the command line's entry point sets MLflow's HTTP retries (``runtime.shorten_mlflow_retries``)."""
    for key in MLFLOW_HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    before = mlflow_settings()
    _, _, tracker = three_epoch_run(tiny_config, tmp_path, mlflow_server)
    tracker.log_epoch({"epoch": 1, "loss": 0.5})
    tracker.finish("KILLED")
    assert mlflow_settings() == before
    assert MlflowClient(mlflow_server.uri).get_run(tracker.run_id).info.status == "KILLED"


@pytest.mark.slow
def test_server_going_away_does_not_stop_training(
    tiny_config: Path, tmp_path: Path, mlflow_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    before = mlflow_settings()
    cfg, run_dir, tracker = three_epoch_run(tiny_config, tmp_path, mlflow_server)

    def log_then_kill(record: dict) -> None:
        tracker.log_epoch(record)
        if record["epoch"] == 1:
            mlflow_server.stop()

    with caplog.at_level(logging.WARNING):
        result = train(TrainRequest(cfg, run_dir, device="cpu", progress=False), on_epoch=log_then_kill)
        tracker.finish()
    assert result.epochs_run == 3 and (run_dir / "best.pt").exists()
    kept = [json.loads(line) for line in (run_dir / "tracking_backlog.jsonl").read_text().splitlines()]
    assert [k["step"] for k in kept] == [2, 3] and "dice_mean" in kept[-1]["metrics"]
    assert "went away" in caplog.text and "tracking_backlog.jsonl" in caplog.text

    revived = same_address(mlflow_server)  # same store, new process: the backlog is sent at the next finish
    revived.start()
    try:
        tracker.finish()
        client = MlflowClient(revived.uri)
        assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [1, 2, 3]
        assert not (run_dir / "tracking_backlog.jsonl").exists()
        assert client.get_run(tracker.run_id).data.tags["medunet.model_uri"].startswith("models:/")  # model logged
        assert mlflow_settings() == before  # MLflow's tracking URI was the server's while the model was logged only
    finally:
        revived.stop()


@pytest.mark.slow
def test_server_coming_back_during_training_gets_the_kept_epochs(
    tiny_config: Path, tmp_path: Path, mlflow_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, run_dir, tracker = three_epoch_run(tiny_config, tmp_path, mlflow_server)
    tracker.RETRY_SECONDS = 0.0  # try the server again at every epoch
    revived = same_address(mlflow_server)
    backlog_steps: list[list[int]] = []

    def log_then_bounce(record: dict) -> None:
        tracker.log_epoch(record)
        backlog = run_dir / "tracking_backlog.jsonl"
        kept = backlog.read_text().splitlines() if backlog.exists() else []
        backlog_steps.append([json.loads(line)["step"] for line in kept])
        if record["epoch"] == 1:
            mlflow_server.stop()
        elif record["epoch"] == 2:
            revived.start()

    try:
        with caplog.at_level(logging.WARNING):
            train(TrainRequest(cfg, run_dir, device="cpu", progress=False), on_epoch=log_then_bounce)
        # epoch 2 is kept while the server is down; epoch 3 finds it back and sends 2, then 3
        assert backlog_steps == [[], [2], []]
        assert "went away" in caplog.text and "is back: sent 1 kept epochs" in caplog.text
        client = MlflowClient(revived.uri)
        history = client.get_metric_history(tracker.run_id, "loss")
        assert [m.step for m in history] == [1, 2, 3]
        tracker.finish()
        assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [1, 2, 3]
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        revived.stop()
