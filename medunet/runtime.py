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
- backs large CPU tensors with transparent huge pages (``THP_MEM_ALLOC_ENABLE``, read by PyTorch at
  its first allocation, so ``configure_cli`` runs before torch is imported): far fewer page faults
  per window;
- lets inference tune glibc's allocator while windows run (``enable_allocator_tuning``,
  ``freed_pages_kept``). A host application may opt in the same way;
- once the model is loaded, moves every object alive into the garbage collector's permanent
  generation (``settle_heap``): inference collects garbage before planning each scan (the previous
  scan's cycles must not count as taken memory), and a full collection over the heap that the
  libraries' imports leave (PyTorch, MONAI, the export and OpenVINO modules) took 0.27 s per scan,
  78% of a small scan's time.

It also says how much CPU the process may use (``available_cpus``, ``cores``: a container's share, not
the host's), which the planner and the threads of processes launched by ``torchrun`` go by.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

_cli = False
_quiet_native = False
_itk_quieted = False
_allocator_tuning = False


def configure_cli() -> None:
    """What the ``medunet`` command sets for its own process (see the module's docstring)."""
    global _cli
    _cli = True
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # see the module's docstring; before torch's first allocation
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


# --- glibc's allocator while windows run (only where enable_allocator_tuning allowed it) ---


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only (the C library this process already has loaded)
    except (OSError, AttributeError):
        return None


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    try:
        return ctypes.CDLL(None).mallopt  # glibc only
    except (OSError, AttributeError):
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_LARGEST_THRESHOLD = 2**31 - 1  # mallopt takes an int
_STEADY_MMAP_THRESHOLD = 32 * 2**20  # where glibc's own sliding threshold ends up after large frees


_tuning_lock = threading.Lock()
_tuned_callers = 0


@contextlib.contextmanager
def freed_pages_kept() -> Iterator[None]:
    """Keep the pages of freed tensors in this process while windows run, then hand them back.

    glibc returns every block over its mmap threshold (at most 32 MiB) to the system when it is
    freed, so each layer's new map of a large window starts on fresh pages that the kernel faults
    in and zeroes one by one (the README gives what that cost on a BraTS scan). Inside this context
    blocks up to 2 GiB come from the heap and stay there for the next layer; when the last caller
    leaves, the free pages go back (``malloc_trim``).

    The thresholds belong to the whole process, so this acts only where the process allowed it
    (``enable_allocator_tuning``: the command line does); callers in several threads
    share one setting, counted, so one leaving does not undo it under another. Elsewhere than glibc it
    does nothing.
    """
    global _tuned_callers
    mallopt, trim = _mallopt(), _malloc_trim()
    if mallopt is None or trim is None or not allocator_tuning():
        yield
        return
    with _tuning_lock:
        _tuned_callers += 1
        if _tuned_callers == 1:
            mallopt(_M_MMAP_THRESHOLD, _LARGEST_THRESHOLD)
            mallopt(_M_TRIM_THRESHOLD, _LARGEST_THRESHOLD)
    try:
        yield
    finally:
        with _tuning_lock:
            _tuned_callers -= 1
            if _tuned_callers == 0:
                mallopt(_M_MMAP_THRESHOLD, _STEADY_MMAP_THRESHOLD)
                mallopt(_M_TRIM_THRESHOLD, 2 * _STEADY_MMAP_THRESHOLD)  # glibc's ratio to the sliding threshold
                trim(0)


def release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the system.

    glibc keeps the pages of freed tensors (a previous scan, a previous recipe) resident, so
    ``resident_memory`` would count them as taken and plan smaller windows than the budget allows.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def cores() -> int:
    """The CPU cores this process may run on (a container's share, not the host's), rounded up."""
    return max(1, math.ceil(available_cpus()))


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> float:
    """CPUs' worth of time this process may use: the cores it may be scheduled on, at most what a
    cgroup's quota allows per period (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``; ``docker --cpus``)."""
    on = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()  # -1: no limit
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return on
    if quota.isdigit() and period.isdigit() and int(period) > 0:
        return min(on, int(quota) / int(period))
    return on
