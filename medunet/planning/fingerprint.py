"""Dataset fingerprint and integrity check: one pass over every case, in parallel, cached.

Per case: shape, spacing (both in RAS axis order, as training orients images), orientation code,
foreground box, label voxel counts and class centroids; per channel a sample of foreground
intensities with their mean and std. Problems (unreadable file, label on another grid, channel count,
undeclared label value, missing label) are collected for every case, so the whole list is reported at
once. Workers hold one case at a time, so memory stays bounded by the largest case.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medunet.data.layouts import Dataset
from medunet.data.manifest import Case
from medunet.errors import MedunetError

log = logging.getLogger(__name__)

FINGERPRINT_FORMAT = "medunet-fingerprint/1"
SAMPLES_PER_CASE = 10_000  # foreground intensities kept per case and channel (seeded), as nnU-Net does
PERCENTILES = (0.5, 50.0, 99.5)


class DatasetError(MedunetError):
    """A dataset with problems: ``problems`` holds one line per problem, naming the file."""

    def __init__(self, root: Path, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{root}: {len(problems)} problem(s) in the dataset; nothing was written:\n{lines}")


@dataclass(frozen=True)
class _Job:
    case: Case
    channels: int
    channels_in_file: bool
    declared: tuple[int, ...] | None  # label values dataset.json allows (None: any)


def case_fingerprint(job: _Job) -> dict[str, Any]:
    """What the plan needs from one case, or ``{"problems": [...]}`` (runs in a worker process)."""
    import nibabel as nib
    import torch

    from medunet.io import load_image
    from medunet.io.headers import Header, check_same_grid

    torch.set_num_threads(1)
    case = job.case
    out: dict[str, Any] = {"case": case.case_id, "patient": case.patient_id, "problems": []}
    problems: list[str] = out["problems"]
    missing = [p for p in case.images if not p.exists()]
    if missing:
        problems += [f"{p}: image file missing" for p in missing]
    if case.label is None or not case.label.exists():
        problems.append(f"{case.label or case.case_id}: label missing for case {case.case_id}")
    if missing or problems:
        return out
    try:
        in_file = job.channels if job.channels_in_file else 1
        image = load_image(list(case.images), spatial_dims=(2, 3), channels_in_file=in_file)
        assert case.label is not None
        label = load_image(case.label, spatial_dims=(2, 3))
    except MedunetError as exc:
        problems.append(str(exc))
        return out
    if image.shape[0] != job.channels:
        problems.append(f"{case.images[0]}: {image.shape[0]} channel(s), the dataset has {job.channels}")
    try:
        check_same_grid(
            case.label,
            Header(tuple(image.shape[1:]), np.asarray(image.affine)),
            Header(tuple(label.shape[1:]), np.asarray(label.affine)),
        )
    except MedunetError as exc:
        problems.append(str(exc))
        return out
    lab = np.rint(label[0].numpy()).astype(np.int64)
    values, counts = np.unique(lab, return_counts=True)
    if job.declared is not None:
        extra = sorted(set(values.tolist()) - set(job.declared))
        if extra:
            problems.append(f"{case.label}: label value(s) {extra} not declared in dataset.json {list(job.declared)}")
    if problems:
        return out
    dims = lab.ndim
    affine = np.asarray(image.affine, dtype=np.float64)
    if dims == 3:
        ornt = nib.orientations.io_orientation(affine)
        to_ras = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
        lab = nib.orientations.apply_orientation(lab, to_ras)
        order = [int(np.nonzero(ornt[:, 0] == axis)[0][0]) for axis in range(3)]
        spacing = [float(np.linalg.norm(affine[:3, j])) for j in order]
        code = "".join(nib.orientations.aff2axcodes(affine))
    else:
        spacing = [float(np.linalg.norm(affine[:2, j])) for j in range(2)] if affine.shape[0] >= 3 else [1.0, 1.0]
        code = ""
    fg = lab > 0
    box = _box(fg)
    out.update(
        shape=[int(s) for s in lab.shape],
        spacing=spacing,
        orientation=code,
        foreground_box=box,
        label_counts={str(int(v)): int(n) for v, n in zip(values, counts, strict=True)},
        centroids={str(int(v)): _centroid(lab == v, spacing) for v in values if v > 0},
        intensity=[],
    )
    rng = np.random.default_rng(zlib.crc32(case.case_id.encode()))
    arr = image.numpy()
    for c in range(arr.shape[0]):
        channel = arr[c] if dims == 2 else nib.orientations.apply_orientation(arr[c], to_ras)
        values_fg = channel[fg] if fg.any() else channel.ravel()
        values_fg = values_fg[np.isfinite(values_fg)]
        sample = rng.choice(values_fg, min(SAMPLES_PER_CASE, values_fg.size), replace=False) if values_fg.size else []
        nonzero = float(np.count_nonzero(channel)) / channel.size
        out["intensity"].append(
            {
                "mean": float(values_fg.mean()) if values_fg.size else 0.0,
                "std": float(values_fg.std()) if values_fg.size else 0.0,
                "min": float(channel.min()),
                "max": float(channel.max()),
                "nonzero_fraction": nonzero,
                "nonzero_box": _box(channel != 0),
                "sample": [float(v) for v in sample],
            }
        )
    return out


def _box(mask: np.ndarray) -> list[list[int]]:
    """``[[lo, hi), ...]`` per axis of the non-zero voxels (the whole image when there are none)."""
    if not mask.any():
        return [[0, int(s)] for s in mask.shape]
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.nonzero(mask.any(axis=other))[0]
        box.append([int(hits[0]), int(hits[-1]) + 1])
    return box


def _centroid(mask: np.ndarray, spacing: Sequence[float]) -> list[float]:
    idx = np.nonzero(mask)
    return [float(np.mean(i)) * s for i, s in zip(idx, spacing, strict=True)]


def cache_key(dataset: Dataset) -> str:
    """Changes when any file of the dataset changes (path, size, modification time) or the declared labels."""
    h = hashlib.sha256(FINGERPRINT_FORMAT.encode())
    for case in dataset.cases:
        for p in (*case.images, *([case.label] if case.label else [])):
            try:
                st = p.stat()
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"{p}|missing".encode())
        h.update(case.patient_id.encode())
    h.update(json.dumps([dataset.channels, dataset.labels, dataset.channels_in_file]).encode())
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    base = os.environ.get("MEDUNET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "medunet"
    )
    return Path(base) / "fingerprints"


def fingerprint_dataset(
    dataset: Dataset, workers: int | None = None, progress: bool = True, use_cache: bool = True
) -> dict[str, Any]:
    """The dataset's fingerprint (see the module docstring); a ``DatasetError`` lists every problem.

    Cached under ``$MEDUNET_CACHE`` (default ``~/.cache/medunet``) by ``cache_key``, so a second
    plan of an unchanged dataset reads it instead of the images.
    """
    layout_problems = list(dataset.problems)  # stray files: listed with the cases' problems; no cache hides them
    key = cache_key(dataset)
    cached = cache_dir() / f"{key}.json"
    if use_cache and cached.is_file() and not layout_problems:
        try:
            fp = json.loads(cached.read_text())
            if fp.get("format") == FINGERPRINT_FORMAT and fp.get("key") == key:
                log.info("fingerprint of %d cases read from the cache (%s)", len(fp["cases"]), cached)
                return dict(fp)
        except (OSError, ValueError):
            pass
    declared = tuple(dataset.labels.values()) if dataset.declared_labels else None
    jobs = [_Job(c, len(dataset.channels), dataset.channels_in_file, declared) for c in dataset.cases]
    results = _map(case_fingerprint, jobs, workers, progress, "fingerprint")
    problems = layout_problems + [p for r in results for p in r["problems"]]
    problems += _cross_case_problems([r for r in results if "shape" in r])
    if problems:
        raise DatasetError(dataset.root, problems)
    fp = summarize(dataset, results, key)
    if use_cache:
        from medunet.io.writers import write_text

        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_text(cached, json.dumps(fp))
        except OSError as exc:  # a read-only home: no cache, same result
            log.warning("fingerprint cache not written (%s)", exc)
    return fp


def _cross_case_problems(results: list[dict[str, Any]]) -> list[str]:
    dims = {len(r["shape"]) for r in results}  # the cases that could be read
    if len(dims) > 1:
        return [f"cases mix 2D and 3D images ({sorted(dims)})"]
    return []


def summarize(dataset: Dataset, results: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Dataset-wide statistics from the per-case results (a plain JSON-able dict)."""
    channels = []
    for c, name in enumerate(dataset.channels):
        pooled = np.concatenate([np.asarray(r["intensity"][c]["sample"], dtype=np.float64) for r in results])
        pct = np.percentile(pooled, PERCENTILES) if pooled.size else np.zeros(len(PERCENTILES))
        channels.append(
            {
                "name": name,
                "foreground_percentiles": {str(p): float(v) for p, v in zip(PERCENTILES, pct, strict=True)},
                "foreground_mean": float(pooled.mean()) if pooled.size else 0.0,
                "foreground_std": float(pooled.std()) if pooled.size else 1.0,
                "median_nonzero_fraction": float(np.median([r["intensity"][c]["nonzero_fraction"] for r in results])),
            }
        )
    values = sorted({int(v) for r in results for v in r["label_counts"]})
    labels = dataset.labels or {("background" if v == 0 else f"label{v}"): v for v in values}
    per_label = {name: sum(r["label_counts"].get(str(v), 0) for r in results) for name, v in labels.items()}
    cases = [{k: v for k, v in r.items() if k not in ("problems", "intensity")} for r in results]
    for case, r in zip(cases, results, strict=True):
        case["intensity"] = [{k: v for k, v in ch.items() if k != "sample"} for ch in r["intensity"]]
    return {
        "format": FINGERPRINT_FORMAT,
        "key": key,
        "dataset": str(dataset.root),
        "layout": dataset.layout,
        "grouping": dataset.grouping,
        "modalities": list(dataset.channels),
        "labels": labels,
        "channels": channels,
        "label_voxels": per_label,
        "cases": cases,
    }


def _map(fn: Callable[[_Job], dict[str, Any]], jobs: list[_Job], workers: int | None, progress: bool, what: str):  # type: ignore[no-untyped-def]
    """``[fn(j) for j in jobs]`` over a pool of worker processes (every core by default), in order."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if workers == 1:
        it = map(fn, jobs)
        return list(_track(it, len(jobs), what, progress))
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
    with ctx.Pool(workers, initializer=_quiet_worker) as pool:
        return list(
            _track(pool.imap(fn, jobs, chunksize=max(1, len(jobs) // (8 * workers))), len(jobs), what, progress)
        )


def _quiet_worker() -> None:
    """Workers report problems through their results; library chatter (MONAI's optional codecs) stays out."""
    logging.basicConfig(level=logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")


def _track(it, total: int, what: str, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return it
    from rich.progress import track

    return track(it, total=total, description=what, transient=True, console=_stderr())


def _stderr():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True)


def median_shape(fp: dict[str, Any]) -> list[float]:
    return [float(v) for v in np.median([c["shape"] for c in fp["cases"]], axis=0)]


def median_spacing(fp: dict[str, Any]) -> list[float]:
    return [float(v) for v in np.median([c["spacing"] for c in fp["cases"]], axis=0)]


def spacing_percentile(fp: dict[str, Any], q: float) -> list[float]:
    return [float(v) for v in np.percentile([c["spacing"] for c in fp["cases"]], q, axis=0)]


def foreground_fraction(fp: dict[str, Any]) -> float:
    """Median share of the image that the foreground box covers."""
    shares = [math.prod(b - a for a, b in c["foreground_box"]) / math.prod(c["shape"]) for c in fp["cases"]]
    return float(np.median(shares))
