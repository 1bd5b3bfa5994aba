"""Errors a user can act on. The CLI prints them as one line on stderr and exits non-zero."""

from __future__ import annotations

from pathlib import Path


class MedunetError(Exception):
    """Base class for errors caused by input, not by a bug."""


class InputError(MedunetError):
    """A file that cannot be used: the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def user_error_in(exc: BaseException) -> MedunetError | None:
    """The ``MedunetError`` behind ``exc``, if any (MONAI wraps transform errors in ``RuntimeError``)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, MedunetError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
