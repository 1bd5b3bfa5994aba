"""Training on tiny generated volumes: it learns, is reproducible, resumes bitwise, and its files hold
what they should."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from medunet.config import load_config
from medunet.io import load_checkpoint
from medunet.networks import create_network
from medunet.training import TrainRequest, TrainResult, train
from medunet.training.data import build_loaders, split_cases
from medunet.training.distributed import World
from medunet.training.loop import validate

TIMES = {"seconds", "val_seconds", "elapsed"}  # the clock's readings differ from run to run


class Killed(Exception):
    pass


def run(cfg_path: Path, out: Path, **overrides: Any) -> TrainResult:
    cfg = load_config(cfg_path, overrides)
    return train(TrainRequest(cfg, out, device="cpu", progress=False))


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """``a`` and ``b`` equal bit for bit (tensors included), clock readings aside."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            if k not in TIMES:
                assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.slow
def test_training_writes_everything(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run(tiny_config, out)
    assert {p.name for p in out.iterdir()} == {"best.pt", "last.pt", "config.yaml", "history.json", "split.json"}
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert {"loss", "lr", "seconds", "val_seconds", "dice_one", "dice_two", "dice_mean"} <= set(history[-1])
    for h in history:
        assert h["dice_mean"] == pytest.approx((h["dice_one"] + h["dice_two"]) / 2)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["network"]["features"] == [8, 16, 32] and saved["train"]["epochs"] == 3
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) == 6 and len(split["val"]) == 2  # 4 patients of 2 scans, a quarter validated
    assert not {c[:2] for c in split["train"]} & {c[:2] for c in split["val"]}

    # the result is the best validated epoch of the history
    best_record = max(history, key=lambda h: h["dice_mean"])
    assert (result.best_epoch, result.best_dice) == (best_record["epoch"], best_record["dice_mean"])
    assert result.class_dice == {"one": best_record["dice_one"], "two": best_record["dice_two"]}
    assert result.epochs_run == 3 and result.best_checkpoint == out / "best.pt"

    # best.pt: what inference needs, of the best epoch; last.pt: that and what resuming needs
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    assert set(best) == {"format", "network", "preprocess", "infer", "state_dict", "epoch", "dice"}
    assert best["preprocess"]["label_names"] == ["background", "one", "two"]
    assert (best["epoch"], best["dice"]) == (result.best_epoch - 1, result.best_dice)
    resuming = {"config", "optimizer", "scaler", "rng", "best_dice", "best_epoch", "history", "elapsed"}
    assert set(last) == set(best) - {"dice"} | resuming
    assert (last["epoch"], last["best_dice"], last["best_epoch"]) == (2, result.best_dice, result.best_epoch)
    assert last["history"] == history and last["config"] == saved
    assert last["elapsed"] == history[-1]["seconds"]
    assert {"python", "numpy", "torch"} <= set(last["rng"])

    # the weights in best.pt score the Dice recorded for their epoch
    cfg = load_config(tiny_config)
    net = create_network(cfg.network).to(memory_format=torch.channels_last_3d)  # as trained
    net.load_state_dict(best["state_dict"])
    assert len(last["optimizer"]["state"]) == len(list(net.parameters()))  # Adam's moments of every weight
    (tmp_path / "again").mkdir()
    loaders = build_loaders(cfg, split_cases(cfg, tmp_path / "again", World()), World())
    dice = validate(net, loaders.val, cfg, torch.device("cpu"))
    assert float(dice.mean()) == pytest.approx(result.best_dice, abs=1e-6)


def test_seeded_runs_are_reproducible(tiny_config: Path, tmp_path: Path) -> None:
    run(tiny_config, tmp_path / "a", **{"train.epochs": 2})
    run(tiny_config, tmp_path / "b", **{"train.epochs": 2})
    assert_same(load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt"))


@pytest.mark.slow
def test_a_loader_worker_draws_what_the_training_process_draws(tiny_config: Path, tmp_path: Path) -> None:
    """Plans on CPU prepare batches in a loader process: the crops and augmentations, and so the trained
    weights, are those of a run that prepares them itself. Trained through the command line, so that
    the loader's worker processes (and the SIGCHLD handler torch installs for them) stay out of the
    test process."""
    for name, workers in (("inline", 0), ("worker", 1)):
        proc = subprocess.run(
            [sys.executable, "-m", "medunet", "train", "--config", str(tiny_config), "--output",
             str(tmp_path / name), "--epochs", "2", "--no-tracking", "-q", "--set", f"train.num_workers={workers}"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    inline, worker = (load_checkpoint(tmp_path / r / "last.pt") for r in ("inline", "worker"))
    inline["config"]["train"]["num_workers"] = 1
    assert_same(inline, worker)


def test_cases_left_out_of_the_cache_train_the_same_weights(tiny_config: Path, tmp_path: Path) -> None:
    """A dataset too large for memory is cached in part (``data.cache_rate``); the others are read and
    transformed again when drawn, with the same seeded crops and augmentations."""
    run(tiny_config, tmp_path / "all", **{"train.epochs": 2})
    run(tiny_config, tmp_path / "part", **{"train.epochs": 2, "data.cache_rate": 0.5})
    full, part = (load_checkpoint(tmp_path / r / "last.pt") for r in ("all", "part"))
    full["config"]["data"]["cache_rate"] = 0.5
    assert_same(full, part)


def test_resume_is_bitwise_an_uninterrupted_run(tiny_config: Path, tmp_path: Path) -> None:
    """Killed after epoch 2 of 4 (validated every other epoch), then resumed: the same weights, optimizer,
    random state, history and best model as a run never stopped."""
    overrides = {"train.epochs": 4, "train.val_every": 2}
    run(tiny_config, tmp_path / "full", **overrides)
    cfg = load_config(tiny_config, overrides)

    def die_after_two(record: dict) -> None:
        if record["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        train(TrainRequest(cfg, tmp_path / "cut", device="cpu", progress=False), on_epoch=die_after_two)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    seen: list[int] = []
    result = train(
        TrainRequest(cfg, tmp_path / "cut", resume=True, device="cpu", progress=False),
        on_epoch=lambda r: seen.append(r["epoch"]),
    )
    assert seen == [3, 4] and result.epochs_run == 4  # only the epochs left were trained
    for name in ("last.pt", "best.pt"):
        assert_same(load_checkpoint(tmp_path / "full" / name), load_checkpoint(tmp_path / "cut" / name), name)
    full, cut = (json.loads((tmp_path / r / "history.json").read_text()) for r in ("full", "cut"))
    assert_same(full, cut, "history")


def test_resume_without_a_checkpoint_starts_afresh(tiny_config: Path, tmp_path: Path) -> None:
    cfg = load_config(tiny_config, {"train.epochs": 1})
    result = train(TrainRequest(cfg, tmp_path / "new", resume=True, device="cpu", progress=False))
    assert result.epochs_run == 1 and load_checkpoint(tmp_path / "new" / "last.pt")["epoch"] == 0


def test_learns_blobs(tiny_config: Path, tmp_path: Path) -> None:
    result = run(tiny_config, tmp_path / "run", **{"train.epochs": 15, "train.val_every": 5})
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    losses = [h["loss"] for h in history]
    assert losses[-1] < 0.5 * losses[0]  # DiceCE at least halves
    assert sum(losses[-3:]) < sum(losses[:3])
    dice = [h["dice_mean"] for h in history if "dice_mean" in h]
    assert len(dice) == 3 and dice[-1] > dice[0]  # validated at epochs 5, 10 and 15, getting better
    assert result.best_dice > 0.6
