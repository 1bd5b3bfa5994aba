"""Process-wide settings, applied by the command line's entry point only.

The Python API (``medunet.segment``, ``load_model``, ``load_image``) changes nothing global: a host
application keeps its own stderr, signal handlers and warning filters. The ``medunet`` command
(``configure_cli`` in its ``main()``, ``quiet_native_warnings`` where each command sets up its log)

- switches off ITK's (and GDCM's) warnings, which its C++ code prints straight to the process's
  stderr, unless ``-v`` asks for them: medunet states each problem in its own words, once (a damaged
  DICOM series, say, is checked and described before ITK reads it);
- turns SIGTERM into the same clean stop as Ctrl-C (temporary files removed, statistics of the scans
  already written kept);
- waits seconds, not MLflow's minutes, for a tracking server that does not answer
  (``shorten_mlflow_retries``: ``MLFLOW_HTTP_REQUEST_*``, where the environment does not set them);
  training keeps the metrics of an outage in its tracking backlog;
- lets inference tune glibc's allocator while windows run (``enable_allocator_tuning``; see
  ``medunet.inference.tiling.freed_pages_kept``). A host application may opt in the same way;
- once the model is loaded, moves every object alive into the garbage collector's permanent
  generation (``settle_heap``): inference collects garbage before planning each scan (the previous
  scan's cycles must not count as taken memory), and a full collection over the heap that the
  libraries' imports leave (PyTorch, MONAI, the export and OpenVINO modules) took 0.27 s per scan,
  78% of a small scan's time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_cli = False
_quiet_native = False
_itk_quieted = False
_allocator_tuning = False


def configure_cli() -> None:
    """What the ``medunet`` command sets for its own process (see the module's docstring)."""
    global _cli
    _cli = True
    signal.signal(signal.SIGTERM, _terminated)
    enable_allocator_tuning()
    shorten_mlflow_retries()


# A few seconds of retries instead of MLflow's minutes: enough for a dropped keep-alive connection or a
# busy server; the tracking backlog covers real outages.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def shorten_mlflow_retries() -> None:
    """MLflow's HTTP retries and timeout shortened (``MLFLOW_HTTP_DEFAULTS``) where the environment does
    not set them. Environment variables are the process's (and its children's), so the library never
    sets them on its own."""
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def quiet_native_warnings(quiet: bool = True) -> None:
    """Keep ITK's C++ warnings off stderr (the command line at default verbosity)."""
    global _quiet_native
    _quiet_native = quiet


def before_itk_read() -> None:
    """Called before ITK reads a file: applies ``quiet_native_warnings`` once, where it was asked for."""
    global _itk_quieted
    if _quiet_native and not _itk_quieted:
        import itk

        itk.Object.SetGlobalWarningDisplay(False)
        _itk_quieted = True


def enable_allocator_tuning(enabled: bool = True) -> None:
    """Allow inference to change glibc's malloc thresholds for the process while windows run (faster
    on large scans; the thresholds are process-wide, so a library leaves them alone unless asked)."""
    global _allocator_tuning
    _allocator_tuning = enabled


def allocator_tuning() -> bool:
    return _allocator_tuning


def settle_heap() -> None:
    """Collect garbage, then exempt what is left (modules, the loaded model) from later collections
    (``gc.freeze``): they stay alive for the whole run, and a later full collection scans only what
    was made since. Objects frozen here that become garbage in a reference cycle are not collected."""
    import gc

    gc.collect()
    gc.freeze()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process stands so that clean-up runs as for Ctrl-C."""


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM during a short step that must not be cut in two (an output written and
    recorded), then act on them. Only under the command line, in its main thread; elsewhere nothing."""
    if not _cli or threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = {s: signal.signal(s, lambda signum, _frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
        if caught:
            raise Terminated if caught[0] == signal.SIGTERM else KeyboardInterrupt
