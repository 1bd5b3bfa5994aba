"""``medunet train`` as one library call: a training job, with its MLflow tracking run around it.

``run_job`` trains one model (or, with ``folds``, every fold of a cross-validation), each inside
its own tracking run (started before the training, finished after it, marked FAILED or KILLED
when the training stops early) on rank 0 only; a single model whose ``infer.tta`` or
``infer.largest_component`` is left open gets them chosen on the validation cases before its run is finished,
so the tracked model carries the choice; the folds of a cross-validation get one choice, made on
every fold's own validation cases pooled (as nnU-Net decides on its out-of-fold predictions), after
their runs. It leaves the ``torchrun`` process group at the end.

This module sits at the top of ``training``: it reaches ``medunet.tracking`` and
``medunet.planning.postprocess`` (which segments through ``medunet.inference``), both imported only
when used.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medunet.config import ExperimentConfig
from medunet.training.crossval import SUMMARY_CSV, cross_validate, format_summary
from medunet.training.distributed import close_world, current_world
from medunet.training.loop import EpochHook, TrainRequest, TrainResult, train

log = logging.getLogger(__name__)

Notify = Callable[[str], None]  # where the job's messages for the user go (the command line prints them)


def config_overrides(
    settings: Iterable[str], epochs: int | None = None, fold: int | None = None, folds: int | None = None
) -> dict[str, Any]:
    """Dotted config keys from ``KEY=VALUE`` settings (values read as YAML: ``train.batch_size=4``),
    then from the options that name one key each."""
    overrides: dict[str, Any] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    named = {"train.epochs": epochs, "data.fold": fold, "data.folds": folds}
    return overrides | {key: value for key, value in named.items() if value is not None}


@dataclass(frozen=True)
class Tracking:
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI or the embedded SQLite store
    experiment: str | None = None  # None: the config's name
    register_as: str | None = None  # register the best model under this name


@dataclass(frozen=True)
class TrainJob:
    """``run``: what to train and where (one model, or each fold's); ``folds``: cross-validate, training
    every one of this many folds into ``OUTPUT/fold_k``; ``tracking``: where the runs are recorded."""

    run: TrainRequest
    folds: int | None = None
    tracking: Tracking = field(default_factory=Tracking)

    def __post_init__(self) -> None:
        if self.tracking.register_as and not self.tracking.enabled:
            raise ValueError("--register needs tracking; drop --no-tracking")
        if self.tracking.register_as and self.folds is not None:
            raise ValueError("--register takes one model; register the folds' bundle (medunet bundle build) instead")


@dataclass(frozen=True)
class TrainOutcome:
    output: Path
    result: TrainResult | None = None  # one model
    summary: dict[str, Any] | None = None  # a cross-validation (``cross_validate``)

    def describe(self) -> str:
        """The lines ``medunet train`` ends with."""
        if self.summary is not None:
            where = f"summary: {self.output / SUMMARY_CSV}; ensemble of the folds: --model {self.output}"
            return f"{format_summary(self.summary)}\n{where}"
        assert self.result is not None
        r = self.result
        per_class = "  ".join(f"{k}={v:.4f}" for k, v in r.class_dice.items())
        return (
            f"best mean Dice {r.best_dice:.4f} at epoch {r.best_epoch} ({per_class}); "
            f"{r.epochs_run} epochs in {r.seconds / 60:.1f} min; model: {r.best_checkpoint}"
        )


def run_job(job: TrainJob, notify: Notify = log.info) -> TrainOutcome:
    """Train ``job`` inside its tracking run(s); see the module docstring."""
    world = current_world()
    tracking = job.tracking if world.is_main else Tracking(enabled=False)
    run = job.run
    try:
        if job.folds is not None:
            summary = cross_validate(
                run.config,
                run.output,
                job.folds,
                run.resume,
                run.device,
                progress=run.progress,
                hooks=lambda cfg, out: tracking_run(cfg, out, tracking, notify),
                is_main=world.is_main,
            )
            if decisions_left_open(run.config) and world.is_main:
                folds = [Path(fold["checkpoint"]) for fold in summary["folds"]]
                notify(f"{choose_postprocessing(folds, run.config)} (each fold's own, pooled)")
            return TrainOutcome(run.output, summary=summary)
        with tracking_run(run.config, run.output, tracking, notify) as on_epoch:
            result = train(run, on_epoch=on_epoch)
            if decisions_left_open(run.config) and world.is_main:
                notify(choose_postprocessing([result.best_checkpoint], run.config))
        return TrainOutcome(run.output, result=result)
    finally:
        close_world()


@contextlib.contextmanager
def tracking_run(cfg: ExperimentConfig, output: Path, tracking: Tracking, notify: Notify) -> Iterator[EpochHook | None]:
    """A new MLflow run for training ``cfg`` into ``output``, yielding its epoch hook (None without
    tracking); finished when the training ends, as FAILED or KILLED when it raises."""
    if not tracking.enabled:
        yield None
        return
    from medunet.tracking import RunTracker, TrackingRequest

    output.mkdir(parents=True, exist_ok=True)
    tracker = RunTracker(TrackingRequest(cfg, output, tracking.uri, tracking.experiment, tracking.register_as))
    try:
        yield tracker.log_epoch
    except BaseException as exc:
        tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.finish()
    notify(f"MLflow run {tracker.run_id} at {tracker.uri}")


def decisions_left_open(cfg: ExperimentConfig) -> bool:
    """Whether the config leaves mirrored averaging or the largest-component filter to the validation cases."""
    return cfg.infer.tta is None or cfg.infer.largest_component is None


def choose_postprocessing(checkpoints: list[Path], cfg: ExperimentConfig) -> str:
    """Decide mirrored averaging and the largest-component filter, where the config leaves them open, on
    the validation cases of ``checkpoints`` (one model, or every fold of a cross-validation, pooled) and
    write them into each; the decision in one line."""
    from medunet.planning.postprocess import choose_postprocessing as choose

    return choose(checkpoints, cfg).describe()
