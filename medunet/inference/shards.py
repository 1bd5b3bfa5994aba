"""Splitting a batch of scans over processes and machines, and merging their statistics.

``--shard K/N`` (a scheduler array: SLURM, Kubernetes indexed jobs) or a launch by ``torchrun``
(``RANK`` of ``WORLD_SIZE``) gives this process every N-th scan of the sorted scan list, starting
at the K-th (K counts from 0): the split depends only on the list, so a shard rerun with
``--resume`` takes the same scans and skips the finished ones.

Each shard writes the statistics of its scans to its own part file beside the CSV asked for
(``.<name>.parts/K-of-N.csv``) and then, holding a lock, merges every part of the N shards into
the CSV itself, one row per scan and label. The last shard to finish leaves the complete CSV; a
shard killed and rerun rewrites its part (its finished scans' rows kept or recomputed from their
masks), so no row is lost or repeated.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from medunet.io.writers import atomic_path

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    index: int  # 0 <= index < count
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, items: Sequence[T]) -> list[T]:
        """Every ``count``-th item from ``index`` on: neighbouring scans, often alike in size, spread out."""
        return list(items[self.index :: self.count])


def parse_shard(text: str) -> Shard:
    """``"K/N"`` -> ``Shard(K, N)``; K counts from 0."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--shard {text!r}: write K/N, e.g. 0/4 for the first of 4 shards")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text}: K counts from 0 to N-1 (e.g. 0/4 ... 3/4)")
    return Shard(index, count)


def launcher_shard(env: dict[str, str] | None = None) -> Shard | None:
    """The shard ``torchrun`` (or any launcher setting ``RANK`` and ``WORLD_SIZE``) gives this process."""
    env = dict(os.environ) if env is None else env
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    return Shard(rank, world) if world > 1 and 0 <= rank < world else None


def part_path(stats: Path, shard: Shard) -> Path:
    return stats.parent / f".{stats.name}.parts" / f"{shard.index}-of-{shard.count}.csv"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing), held across processes of this machine and,
    where the file system supports it, of others (NFS with lockd, Lustre with flock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Merged:
    path: Path
    shards_done: int  # parts found
    shards: int
    rows: int


def merge_parts(stats: Path, count: int, columns: Sequence[str]) -> Merged:
    """Write ``stats`` from every ``K-of-count`` part there is: one row per (scan, label), the part
    written last winning, rows sorted by scan."""
    folder = stats.parent / f".{stats.name}.parts"
    with _locked(folder / ".lock"):
        parts = sorted(folder.glob(f"*-of-{count}.csv"), key=lambda p: p.stat().st_mtime)
        rows: dict[tuple[str, str], dict[str, str]] = {}
        for part in parts:
            with open(part, newline="") as f:
                reader = csv.DictReader(f)
                if tuple(reader.fieldnames or ()) != tuple(columns):
                    continue
                for row in reader:
                    rows[(row["scan"], str(row["label"]))] = row
        ordered = [rows[k] for k in sorted(rows, key=lambda k: (k[0], _number(k[1])))]
        with atomic_path(stats) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(ordered)
    return Merged(stats, len(parts), count, len(ordered))


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")
