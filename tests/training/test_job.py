"""run_job, the library call behind ``medunet train``: its config overrides, its checks, and the tracking
run it opens before training and closes after (against a stand-in for the MLflow tracker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import medunet
import medunet.tracking
from medunet.config import load_config
from medunet.io import load_checkpoint
from medunet.tracking import TrackingRequest
from medunet.training import Tracking, TrainJob, TrainOutcome, TrainRequest, TrainResult, run_job
from medunet.training.job import config_overrides, tracking_run


class FakeTracker:
    """Records what the job asks of ``medunet.tracking.RunTracker``."""

    events: list[tuple[str, Any]]

    def __init__(self, req: TrackingRequest) -> None:
        self.req, self.run_id, self.uri = req, "run123", "sqlite:///here.db"
        FakeTracker.events.append(("start", req.run_dir))

    def log_epoch(self, record: dict[str, Any]) -> None:
        FakeTracker.events.append(("epoch", record["epoch"]))

    def finish(self, status: str = "FINISHED") -> None:
        FakeTracker.events.append(("finish", status))


@pytest.fixture
def fake_tracker(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    FakeTracker.events = []
    monkeypatch.setattr(medunet.tracking, "RunTracker", FakeTracker)
    return FakeTracker.events


def test_config_overrides() -> None:
    got = config_overrides(["train.batch_size=4", "train.epochs=9", "infer.roi_size=[8, 8]", "name=a=b"], epochs=2)
    assert got == {"train.batch_size": 4, "train.epochs": 2, "infer.roi_size": [8, 8], "name": "a=b"}
    assert config_overrides([], fold=1, folds=5) == {"data.fold": 1, "data.folds": 5}
    with pytest.raises(ValueError, match=r"--set expects KEY=VALUE, got 'train\.epochs'"):
        config_overrides(["train.epochs"])


def test_job_refuses_registering_what_is_not_one_tracked_model(tiny_config: Path, tmp_path: Path) -> None:
    cfg = load_config(tiny_config)
    with pytest.raises(ValueError, match="--register needs tracking"):
        TrainJob(TrainRequest(cfg, tmp_path), tracking=Tracking(enabled=False, register_as="m"))
    with pytest.raises(ValueError, match="--register takes one model"):
        TrainJob(TrainRequest(cfg, tmp_path), folds=3, tracking=Tracking(register_as="m"))


def test_tracking_run_life_cycle(tiny_config: Path, tmp_path: Path, fake_tracker: list) -> None:
    cfg, said = load_config(tiny_config), []
    with tracking_run(cfg, tmp_path / "a", Tracking(), said.append) as hook:
        assert hook is not None
        hook({"epoch": 1})
    assert fake_tracker == [("start", tmp_path / "a"), ("epoch", 1), ("finish", "FINISHED")]
    assert said == ["MLflow run run123 at sqlite:///here.db"]

    fake_tracker.clear()
    with pytest.raises(RuntimeError), tracking_run(cfg, tmp_path / "b", Tracking(), said.append):
        raise RuntimeError("training failed")
    with pytest.raises(KeyboardInterrupt), tracking_run(cfg, tmp_path / "c", Tracking(), said.append):
        raise KeyboardInterrupt
    assert [e for e in fake_tracker if e[0] == "finish"] == [("finish", "FAILED"), ("finish", "KILLED")]
    assert len(said) == 1  # no run line for runs that did not finish

    fake_tracker.clear()
    with tracking_run(cfg, tmp_path / "d", Tracking(enabled=False), said.append) as hook:
        assert hook is None
    assert fake_tracker == []


@pytest.fixture
def averaged(monkeypatch: pytest.MonkeyPatch) -> list[bool | None]:
    """The ``tta`` of every segmentation the choice of post-processing asks for (the real one runs)."""
    import medunet.inference.predictor as predictor

    asked: list[bool | None] = []
    real = predictor.segment

    def segment(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs["options"].tta)
        return real(*args, **kwargs)

    monkeypatch.setattr(predictor, "segment", segment)
    return asked


def test_run_job_trains_inside_its_tracking_run(
    tiny_config: Path, tmp_path: Path, fake_tracker: list, averaged: list
) -> None:
    """Mirrored averaging and the post-processing are chosen (and written into best.pt) before the
    tracking run is finished, so the model the tracker logs carries them."""
    import re

    overrides = {"train.epochs": 2, "infer.largest_component": None, "infer.tta": None}
    cfg = load_config(tiny_config, {**overrides, "augment.flip_prob": 0.5, "augment.flip_axes": [0]})
    said: list[str] = []
    outcome = run_job(TrainJob(TrainRequest(cfg, tmp_path / "run", device="cpu", progress=False)), notify=said.append)
    assert averaged and averaged == [False, True] * (len(averaged) // 2)  # each volume both ways
    assert re.match(r"mirrored test-time averaging (not )?kept \(\d\.\d{4} -> \d\.\d{4}, mean Dice on", said[0])
    assert outcome.result is not None and outcome.summary is None and outcome.result.epochs_run == 2
    assert fake_tracker == [("start", tmp_path / "run"), ("epoch", 1), ("epoch", 2), ("finish", "FINISHED")]
    assert len(said) == 2 and said[0].startswith("mirrored test-time averaging ")
    assert "; largest-component post-processing " in said[0]
    assert said[1] == "MLflow run run123 at sqlite:///here.db"
    infer = load_checkpoint(tmp_path / "run" / "best.pt")["infer"]
    assert isinstance(infer["largest_component"], bool) and isinstance(infer["largest_component_foreground"], bool)
    model = medunet.load_model(tmp_path / "run" / "best.pt")  # the choice as inference reads it
    assert model.infer.largest_component_classes == tuple(infer["largest_component_classes"])
    assert model.infer.largest_component_foreground == infer["largest_component_foreground"]
    assert ("post-processing kept" in said[0]) == infer["largest_component"]
    assert isinstance(infer["tta"], bool) and model.infer.tta == infer["tta"] and model.infer.tta_axes == (0,)
    assert ("averaging kept" in said[0]) == infer["tta"]
    assert outcome.describe().startswith(f"best mean Dice {outcome.result.best_dice:.4f} at epoch ")


def test_run_job_tracks_each_fold(tiny_config: Path, tmp_path: Path, fake_tracker: list, averaged: list) -> None:
    """Each fold in its own tracking run; post-processing left open is chosen once, on every fold's own
    validation cases pooled (each case validated by the fold that did not train on it), for all folds,
    on the segmentations inference will make: averaged, as the config fixes it."""
    import csv

    overrides = {"train.epochs": 1, "infer.largest_component": None, "infer.tta": True}
    cfg = load_config(tiny_config, {**overrides, "augment.flip_prob": 0.5, "augment.flip_axes": [0]})
    said: list[str] = []
    job = TrainJob(TrainRequest(cfg, tmp_path / "cv", device="cpu", progress=False), folds=2)
    outcome = run_job(job, notify=said.append)
    assert outcome.result is None and outcome.summary is not None and len(outcome.summary["folds"]) == 2
    folds = [tmp_path / "cv" / f"fold_{k}" for k in range(2)]
    assert fake_tracker == [e for f in folds for e in (("start", f), ("epoch", 1), ("finish", "FINISHED"))]
    assert said[:2] == ["MLflow run run123 at sqlite:///here.db"] * 2 and len(said) == 3
    with open(cfg.data.manifest) as f:
        cases = len(list(csv.DictReader(f)))
    assert said[2].startswith("largest-component post-processing ")
    assert said[2].endswith(f"on {cases} validation volumes (each fold's own, pooled)")
    chosen = [load_checkpoint(f / "best.pt")["infer"] for f in folds]
    assert chosen[0] == chosen[1] and isinstance(chosen[0]["largest_component_classes"], list)
    assert chosen[0]["tta"] is True  # set in the config, so left as it is
    assert averaged == [True] * cases  # each volume once, as the config says inference segments it


def test_outcome_lines(tmp_path: Path) -> None:
    result = TrainResult(tmp_path, tmp_path / "best.pt", 0.75, 3, {"one": 0.7, "two": 0.8}, 4, 90.0)
    assert TrainOutcome(tmp_path, result=result).describe() == (
        f"best mean Dice 0.7500 at epoch 3 (one=0.7000  two=0.8000); 4 epochs in 1.5 min; model: {tmp_path / 'best.pt'}"
    )
    summary = {
        "folds": [{"fold": 0, "dice": {"one": 0.5}, "dice_mean": 0.5, "best_epoch": 1}],
        "mean": {"one": 0.5, "mean": 0.5},
        "std": {"one": 0.0, "mean": 0.0},
    }
    lines = TrainOutcome(tmp_path, summary=summary).describe().splitlines()
    assert lines[-1] == f"summary: {tmp_path / 'cv_summary.csv'}; ensemble of the folds: --model {tmp_path}"
    assert lines[0].split() == ["fold", "one", "mean"]
