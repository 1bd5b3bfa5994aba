"""Process-wide settings, applied by the command line's entry point only.

The Python API (``medunet.segment``, ``load_model``, ``load_image``) changes nothing global: a host
application keeps its own stderr, signal handlers and warning filters. ``medunet``'s ``main()`` calls
``configure_cli``, which

- captures what native libraries (ITK, GDCM) print straight to the process's stderr while a file
  is read, so that a problem is medunet's one line; ``-v`` logs the captured text;
- turns SIGTERM into the same clean stop as Ctrl-C (temporary files removed, statistics of the scans
  already written kept);
- lets inference tune glibc's allocator while windows run (``enable_allocator_tuning``; see
  ``medunet.inference.tiling.freed_pages_kept``). A host application may opt in the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

_capture_native = False
_allocator_tuning = False


def configure_cli() -> None:
    """What the ``medunet`` command sets for its own process (see the module's docstring)."""
    global _capture_native
    _capture_native = True
    signal.signal(signal.SIGTERM, _terminated)
    enable_allocator_tuning()


def enable_allocator_tuning(enabled: bool = True) -> None:
    """Allow inference to change glibc's malloc thresholds for the process while windows run (faster
    on large scans; the thresholds are process-wide, so a library leaves them alone unless asked)."""
    global _allocator_tuning
    _allocator_tuning = enabled


def allocator_tuning() -> bool:
    return _allocator_tuning


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process stands so that clean-up runs as for Ctrl-C."""


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def native_output(name: str | Path) -> Iterator[None]:
    """Under the command line, hold what native code writes to stderr (fd 2) during the block and log
    it at debug level (``-v``) afterwards, once, naming the file; elsewhere do nothing."""
    if not _capture_native:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                log.debug("%s: the image reader printed:\n%s", name, text)
