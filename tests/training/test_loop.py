"""Training on tiny generated volumes: it learns, is reproducible, and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from medunet.config import load_config
from medunet.io import load_checkpoint
from medunet.training import TrainRequest, train


class Killed(Exception):
    pass


def run(cfg_path: Path, out: Path, **overrides) -> object:
    cfg = load_config(cfg_path, overrides)
    return train(TrainRequest(cfg, out, device="cpu", progress=False))


def test_training_writes_everything(tiny_config: Path, tmp_path: Path) -> None:
    result = run(tiny_config, tmp_path / "run")
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} >= {"best.pt", "last.pt", "config.yaml", "history.json", "split.json"}
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert {"loss", "lr", "dice_one", "dice_two", "dice_mean"} <= set(history[-1])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["network"]["features"] == [8, 16, 32] and saved["train"]["epochs"] == 3
    split = json.loads((out / "split.json").read_text())
    assert not {c[:2] for c in split["train"]} & {c[:2] for c in split["val"]}
    best = load_checkpoint(out / "best.pt")
    assert {"network", "preprocess", "infer", "state_dict"} <= set(best)
    assert best["preprocess"]["label_names"] == ["background", "one", "two"]
    assert "optimizer" not in best  # the model file carries what inference needs, nothing more
    assert 0.0 <= result.best_dice <= 1.0


def test_seeded_runs_are_reproducible(tiny_config: Path, tmp_path: Path) -> None:
    run(tiny_config, tmp_path / "a", **{"train.epochs": 2})
    run(tiny_config, tmp_path / "b", **{"train.epochs": 2})
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k])


def test_resume_continues_exactly(tiny_config: Path, tmp_path: Path) -> None:
    run(tiny_config, tmp_path / "full")
    cfg = load_config(tiny_config)

    def die_after_two(record: dict) -> None:
        if record["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        train(TrainRequest(cfg, tmp_path / "cut", device="cpu", progress=False), on_epoch=die_after_two)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    train(TrainRequest(cfg, tmp_path / "cut", resume=True, device="cpu", progress=False))
    full, cut = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    assert cut["epoch"] == 2 and [h["epoch"] for h in cut["history"]] == [1, 2, 3]
    for k in full["state_dict"]:
        torch.testing.assert_close(full["state_dict"][k], cut["state_dict"][k])


def test_learns_blobs(tiny_config: Path, tmp_path: Path) -> None:
    result = run(tiny_config, tmp_path / "run", **{"train.epochs": 15, "train.val_every": 15})
    assert result.best_dice > 0.6
