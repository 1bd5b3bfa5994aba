"""Segmenting many scans: read, network and write stages in a pipeline; output naming; per-file errors
that do not stop the others."""

from __future__ import annotations

import csv
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch
from monai.data import MetaTensor

from medunet import runtime
from medunet.errors import InputError, MedunetError
from medunet.evaluation.pictures import qc_picture
from medunet.inference.model import SegmentationModel
from medunet.inference.predictor import (
    InferOptions,
    LoadedScan,
    Predicted,
    Segmentation,
    finish,
    finish_scan,
    load_scan,
    predict,
)
from medunet.io import write_array
from medunet.io.dicom_seg import write_dicom_seg
from medunet.io.readers import IMAGE_2D_SUFFIXES, NIFTI_SUFFIXES, SUPPORTED, has_suffix
from medunet.io.writers import atomic_path

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES
T = TypeVar("T")


class Flag(Protocol):
    """A way a scan differs from the training data (``medunet.inference.guard.Flag``)."""

    @property
    def code(self) -> str: ...

    @property
    def message(self) -> str: ...


@dataclass(frozen=True)
class Job:
    """One scan (one file per channel, or a DICOM folder) and where its mask goes."""

    inputs: tuple[Path, ...]
    output: Path

    @property
    def name(self) -> str:
        return str(self.inputs[0])


@dataclass
class BatchResult:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    stats_error: str | None = None  # why the statistics CSV could not be written


def scan_name(path: Path) -> str:
    """``case.nii.gz`` -> ``case``; a DICOM folder -> its name."""
    name = path.name
    for suffix in SUPPORTED:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def expand_inputs(inputs: Sequence[str]) -> list[tuple[Path, ...]]:
    """Each argument is a scan (``a.nii.gz``; several channels as ``flair.nii.gz,t1c.nii.gz``; a DICOM
    folder) or a folder of scans (image files, or sub-folders that each hold a DICOM series)."""
    scans: list[tuple[Path, ...]] = []
    for arg in inputs:
        parts = tuple(Path(p) for p in arg.split(",") if p)
        first = parts[0]
        if len(parts) == 1 and first.is_dir() and _is_folder_of_scans(first):
            entries = sorted(p for p in first.iterdir() if not p.name.startswith("."))
            scans += [(p,) for p in entries if p.is_dir() or has_suffix(p, SUPPORTED)]
        else:
            scans.append(parts)
    return scans


def _is_folder_of_scans(folder: Path) -> bool:
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return any(p.is_dir() for p in entries) or any(
        has_suffix(p, SUPPORTED) and not has_suffix(p, (".dcm",)) for p in entries
    )


def plan_jobs(scans: Sequence[tuple[Path, ...]], output: Path, spatial_dims: int) -> list[Job]:
    """One output file for a single scan when ``output`` names a file, else ``output/<scan>.<ext>``."""
    if len(scans) == 1 and has_suffix(output, OUTPUT_SUFFIXES):
        return [Job(scans[0], output)]
    if has_suffix(output, OUTPUT_SUFFIXES):
        raise InputError(output, f"{len(scans)} scans need an output folder, not a file name")
    jobs = []
    for scan in scans:
        keep_2d = spatial_dims == 2 and has_suffix(scan[0], IMAGE_2D_SUFFIXES)
        suffix = scan[0].suffix.lower() if keep_2d else ".nii.gz"
        jobs.append(Job(scan, output / f"{scan_name(scan[0])}{suffix}"))
    names = [j.output for j in jobs]
    if len(set(names)) != len(names):
        raise InputError(output, "two inputs would write the same output name; segment them separately")
    return jobs


def probs_path(output: Path) -> Path:
    return output.parent / f"{scan_name(output)}_probs.nii.gz"


def write_segmentation(seg: Segmentation, model: SegmentationModel, output: Path) -> Path:
    """Write the label map (class indices mapped to the training label values) and, if present,
    the probabilities beside it as ``<name>_probs.nii.gz``."""
    values = np.asarray(model.label_values, dtype=np.uint8)
    if seg.probabilities is not None:
        probs = np.moveaxis(seg.probabilities.numpy(), 0, -1).astype(np.float32)
        write_array(probs, seg.affine, probs_path(output))
        del probs
    write_array(values[seg.labels.numpy()], seg.affine, output)
    return output


STATS_COLUMNS = ("scan", "label", "name", "voxels", "volume_ml", "flags")


def label_statistics(
    seg: Segmentation, model: SegmentationModel, scan: str, flags: str = ""
) -> list[dict[str, object]]:
    """Voxel count and volume (ml; empty for 2D images) of every foreground label, and the input
    guard's ``flags`` for the scan (codes joined by ``;``)."""
    counts = torch.bincount(seg.labels.reshape(-1), minlength=model.preprocess.num_classes).numpy()  # no int64 copy
    spatial = seg.affine[:-1, :-1]
    voxel_ml = abs(float(np.linalg.det(spatial))) / 1000.0 if spatial.shape == (3, 3) else None
    rows: list[dict[str, object]] = []
    for c, (name, value) in enumerate(zip(model.label_names, model.label_values, strict=True)):
        if c == 0:
            continue
        n = int(counts[c])
        volume = "" if voxel_ml is None else f"{n * voxel_ml:.4f}"
        rows.append({"scan": scan, "label": value, "name": name, "voxels": n, "volume_ml": volume, "flags": flags})
    return rows


def mask_statistics(mask: Path, model: SegmentationModel) -> list[dict[str, object]]:
    """``label_statistics`` of a mask already written (a scan that ``--resume`` skips without an
    earlier statistics row)."""
    from medunet.io.readers import load_image

    image = load_image(mask)
    values = image[0].round().to(torch.int64)
    classes = torch.zeros_like(values, dtype=torch.uint8)
    for c, value in enumerate(model.label_values):
        classes[values == int(value)] = c
    seg = Segmentation(labels=classes, affine=np.asarray(image.affine), probabilities=None, source=str(mask))
    return label_statistics(seg, model, scan_name(mask))


def write_statistics(rows: Sequence[dict[str, object]], path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=STATS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_statistics(path: Path) -> list[dict[str, object]]:
    """The rows of an earlier statistics CSV (none if it is missing or not one of ours)."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != STATS_COLUMNS:
                return []
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


@dataclass(frozen=True)
class Extras:
    """Outputs beside each mask: statistics CSV, QC picture, DICOM SEG."""

    stats: Path | None = None  # one CSV for all scans
    qc: Path | None = None  # a .png for one scan, else a folder of <scan>.png
    dicom_seg: bool = False  # <mask name>.seg.dcm beside the mask, for DICOM series inputs

    def qc_path(self, job: Job, n_jobs: int) -> Path | None:
        if self.qc is None:
            return None
        if n_jobs == 1 and self.qc.suffix.lower() == ".png":
            return self.qc
        return self.qc / f"{scan_name(job.output)}.png"


def seg_path(output: Path) -> Path:
    return output.parent / f"{scan_name(output)}.seg.dcm"


# What a bad scan can raise; each is reported on one line and the batch goes on.
JOB_ERRORS = (MedunetError, OSError, ValueError, RuntimeError, MemoryError)


def job_outputs(job: Job, n_jobs: int, probabilities: bool, extras: Extras) -> list[Path]:
    """Every file a job writes, the mask last (a scan whose mask exists is complete)."""
    out = [probs_path(job.output)] if probabilities else []
    if extras.dicom_seg:
        out.append(seg_path(job.output))
    qc = extras.qc_path(job, n_jobs)
    if qc is not None:
        out.append(qc)
    return [*out, job.output]


def check_outputs(jobs: Sequence[Job], probabilities: bool, extras: Extras, input_folders: Sequence[Path] = ()) -> None:
    """Before anything is read: refuse an output that is an input of the run, or that lies in a DICOM
    folder or in a folder of scans given as input (``input_folders``), where a later run would take it
    for a scan; and an output folder that cannot be written."""
    inputs = {_real(p) for job in jobs for p in job.inputs}
    folders = {p for p in inputs if os.path.isdir(p)} | {_real(p) for p in input_folders}
    outputs = [p for job in jobs for p in job_outputs(job, len(jobs), probabilities, extras)]
    if extras.stats is not None:
        outputs.append(extras.stats)
    for path in outputs:
        real = _real(path)
        if real in inputs:
            raise InputError(path, "is an input of this run; writing there would destroy it (choose another path)")
        if any(Path(real).is_relative_to(folder) for folder in folders):
            raise InputError(path, "would be written into an input folder (choose another path)")
    for folder in sorted({_real(p.parent) for p in outputs}):
        check_writable(Path(folder))


def _real(path: Path) -> str:
    return os.path.realpath(os.path.abspath(path))


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and write (and remove) a file in it, or raise ``InputError``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".medunet-probe-"):
            pass
    except OSError as exc:
        raise InputError(folder, f"output folder cannot be written ({exc.strerror or exc})") from None


def describe_failure(job: Job, exc: BaseException, outputs: Sequence[Path]) -> str:
    if isinstance(exc, MedunetError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        if exc.filename and str(exc.filename) in {str(p) for p in outputs}:
            return f"{job.name}: cannot write {exc.filename}: {exc.strerror}"
        where = f"{exc.filename}: " if exc.filename and str(exc.filename) != job.name else ""
        return f"{job.name}: {where}{exc.strerror}"
    return f"{job.name}: {type(exc).__name__}: {exc}"


class _Inline:
    """An executor that runs each call at once, in the calling thread: the sequential loop."""

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def run_jobs(
    jobs: Sequence[Job],
    model: SegmentationModel,
    probabilities: bool = False,
    series: str | None = None,
    skip_existing: bool = False,
    on_done: Callable[[Job], None] | None = None,
    options: InferOptions | None = None,
    extras: Extras | None = None,
    on_error: Callable[[str], None] | None = None,
    accept_damaged: bool = False,
    pipelined: bool = True,
    guard: Callable[[MetaTensor], Sequence[Flag]] | None = None,
    strict: bool = False,
) -> BatchResult:
    """Segment every job; a bad file is reported and skipped while the others finish.

    ``pipelined``: while the network runs on one scan, a reader thread reads and preprocesses the
    next and a writer thread maps the previous one back to its grid and writes its files, so the
    cores do not wait on files; at most one scan is in each stage, and each scan's windows are
    planned against the memory the process holds at that moment (the other stages' scans included).
    The model is loaded once, by the caller.

    ``guard`` compares each scan as read with the training data (``medunet.inference.guard``): its
    flags are logged and go to the statistics' ``flags`` column; ``strict`` refuses a flagged scan.

    The mask is written last, so a scan whose mask exists is complete (``skip_existing``); a scan
    stopped midway (an error, Ctrl-C, SIGTERM) leaves none of its files. The statistics CSV holds
    exactly the scans whose masks exist, those of an earlier run that ``skip_existing`` kept included.
    """
    opts = options or InferOptions(probabilities=probabilities)
    more = extras or Extras()
    result = BatchResult()
    rows: list[dict[str, object]] = []
    earlier = read_statistics(more.stats) if more.stats is not None and skip_existing else []
    report = on_error or log.error
    done = on_done or (lambda _job: None)

    def fail(job: Job, exc: BaseException) -> None:
        message = describe_failure(job, exc, job_outputs(job, len(jobs), opts.probabilities, more))
        result.failed.append((job.name, message))
        report(message)

    def read(job: Job) -> LoadedScan:
        if more.dicom_seg and not job.inputs[0].is_dir():
            raise InputError(job.inputs[0], "--dicom-seg needs a DICOM series folder as input")
        loaded = load_scan(
            list(job.inputs), model, series, keep_scan=more.qc is not None, accept_damaged=accept_damaged,
            check=guard,
        )  # fmt: skip
        flags = list(loaded.checked or [])  # type: ignore[call-overload]
        if flags and strict:
            raise InputError(job.name, f"refused (--strict): unlike the training data: {describe_flags(flags)}")
        # a blank scan's own warning (its mask is left empty) says what the guard's "blank" would
        shown = [f for f in flags if not (f.code == "blank" and loaded.blank is not None)]
        if shown:
            log.warning("%s: unlike the training data: %s", job.name, describe_flags(shown))
        return loaded

    def write(job: Job, predicted: Predicted, loaded: LoadedScan) -> list[dict[str, object]]:
        written: list[Path] = []
        try:
            seg = finish_scan(loaded, finish(predicted, model))
            del predicted
            if more.dicom_seg and not seg.labels.any():
                log.warning("%s: no label found, so no DICOM SEG (it needs a segment)", job.name)
            elif more.dicom_seg:
                write_dicom_seg(
                    seg.labels.numpy(), seg.affine, job.inputs[0], seg_path(job.output),
                    model.label_names, Path(model.source).name, series,
                )  # fmt: skip
                written.append(seg_path(job.output))
            qc = more.qc_path(job, len(jobs))
            if qc is not None and seg.scan is not None:
                labels = seg.labels.numpy()
                qc_picture(seg.scan, labels, model.label_names, qc, scan_name(job.output), seg.spacing)
                written.append(qc)
            if seg.probabilities is not None:
                written.append(probs_path(job.output))  # written before the mask, in one call
            flags = ";".join(sorted({f.code for f in (loaded.checked or [])}))  # type: ignore[attr-defined]
            job_rows = label_statistics(seg, model, scan_name(job.output), flags)
            with runtime.signals_held():  # a mask that exists has its statistics row
                write_segmentation(seg, model, job.output)
                written.clear()  # complete: the mask exists
            return job_rows
        finally:
            for path in written:  # this scan's outputs, when its mask was not written
                path.unlink(missing_ok=True)

    todo: list[Job] = []
    for job in jobs:
        if skip_existing and job.output.exists():
            try:
                result.skipped.append(job.output)
                kept = [r for r in earlier if r.get("scan") == scan_name(job.output)]
                rows += kept or (mask_statistics(job.output, model) if more.stats is not None else [])
            except JOB_ERRORS as exc:
                fail(job, exc)
            done(job)
        else:
            todo.append(job)

    reader: ThreadPoolExecutor | _Inline = ThreadPoolExecutor(1, "medunet-read") if pipelined else _Inline()
    writer: ThreadPoolExecutor | _Inline = ThreadPoolExecutor(1, "medunet-write") if pipelined else _Inline()
    pending: tuple[Job, Future[list[dict[str, object]]]] | None = None  # the write in flight

    def settle() -> None:
        """Wait for the write in flight and record it."""
        nonlocal pending
        if pending is None:
            return
        job, future = pending
        try:
            job_rows = future.result()  # pending is kept until then: a Ctrl-C while waiting settles it later
        except JOB_ERRORS as exc:
            pending = None
            fail(job, exc)
        else:
            pending = None
            result.written.append(job.output)
            rows.extend(job_rows)
        done(job)

    try:
        upcoming = reader.submit(read, todo[0]) if todo else None
        for i, job in enumerate(todo):
            assert upcoming is not None
            current, upcoming = upcoming, None
            try:
                loaded = current.result()
                if i + 1 < len(todo):  # read the next scan while this one runs
                    upcoming = reader.submit(read, todo[i + 1])
                predicted = predict(loaded.prep, model, opts)
                settle()  # one write in flight at a time
                pending = (job, writer.submit(write, job, predicted, loaded))
                del loaded, predicted  # before the next scan is planned against the memory budget
            except JOB_ERRORS as exc:
                fail(job, exc)
                done(job)
            if upcoming is None and i + 1 < len(todo):
                upcoming = reader.submit(read, todo[i + 1])
        settle()
    finally:
        if upcoming is not None:
            upcoming.cancel()
        reader.shutdown(wait=True, cancel_futures=True)
        settle()  # stopped (Ctrl-C, SIGTERM): the scan being written is finished and recorded
        writer.shutdown(wait=True)
        if more.stats is not None:
            try:
                write_statistics(rows, more.stats)
            except OSError as exc:
                result.stats_error = f"{more.stats}: cannot write the statistics ({exc.strerror or exc})"
                report(result.stats_error)
    return result


def describe_flags(flags: Sequence[Flag]) -> str:
    return "; ".join(f.message for f in flags)
