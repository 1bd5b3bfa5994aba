"""A real MLflow tracking server on loopback with a temporary SQLite store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from medunet.runtime import MLFLOW_HTTP_DEFAULTS


@pytest.fixture(autouse=True)
def _short_mlflow_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the ``medunet`` command sets (``runtime.shorten_mlflow_retries``), for the trackers these
    tests make in their own process: a stopped server costs seconds, not MLflow's minutes."""
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        monkeypatch.setenv(key, os.environ.get(key, value))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, seconds: float = 120, proc: subprocess.Popen | None = None) -> None:  # type: ignore[type-arg]
    """Wait until ``url`` answers; fail at once with its stderr if ``proc`` (the server) exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {str(err)[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


class Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.root / 'server.db'}",
                "--default-artifact-root",
                (self.root / "artifacts").as_uri(),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(f"{self.uri}/health")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path / "mlflow_server").start()
    yield server
    server.stop()
