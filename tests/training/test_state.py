"""TrainState saves and resumes itself exactly; the Checkpointer writes best.pt, last.pt and history.json
(and nothing on ranks other than 0)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medunet.config import load_config
from medunet.io import load_checkpoint
from medunet.training.checkpoints import Checkpointer
from medunet.training.state import TrainState


def state_after_steps(seed: int = 0, steps: int = 3) -> TrainState:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.01)
    state = TrainState(net, optimizer, torch.amp.GradScaler("cuda", enabled=False))
    for _ in range(steps):
        loss = net(torch.randn(5, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return state


def draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_end_epoch_keeps_the_best_validated_epoch() -> None:
    state = state_after_steps(steps=0)
    assert state.end_epoch({"epoch": 1, "loss": 1.0, "seconds": 2.0}) is False  # not validated
    assert state.end_epoch({"epoch": 2, "loss": 0.9, "dice_mean": 0.5, "seconds": 4.0}) is True
    assert state.end_epoch({"epoch": 3, "loss": 0.8, "dice_mean": 0.4, "seconds": 6.0}) is False
    assert (state.epochs_done, state.best_epoch, state.best_dice, state.elapsed) == (3, 2, 0.5, 6.0)
    assert [h["epoch"] for h in state.history] == [1, 2, 3]


def test_save_then_resume_restores_everything(tmp_path: Path) -> None:
    state = state_after_steps()
    state.end_epoch({"epoch": 1, "loss": 1.0, "dice_mean": 0.3, "seconds": 5.0})
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    state.save(tmp_path / "last.pt", {"format": "medunet-checkpoint/1"})
    expected = draws()  # what the generators give next after the save

    fresh = state_after_steps(seed=1, steps=0)  # other weights, no optimizer moments
    resumed = TrainState.resume(tmp_path / "last.pt", fresh.net, fresh.optimizer, fresh.scaler)
    got = draws()
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    for a, b in zip(state.net.state_dict().values(), resumed.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(state.optimizer.state.values(), resumed.optimizer.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert (resumed.epochs_done, resumed.best_epoch, resumed.best_dice, resumed.elapsed) == (1, 1, 0.3, 5.0)
    assert resumed.history == state.history and resumed.net is fresh.net

    # and the next steps are those the saved state would have taken
    x = torch.randn(5, 4)
    for s in (state, resumed):
        s.optimizer.zero_grad()
        s.net(x).square().mean().backward()
        s.optimizer.step()
    for a, b in zip(state.net.parameters(), resumed.net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpointer_files(tiny_config: Path, tmp_path: Path) -> None:
    cfg = load_config(tiny_config)
    state = state_after_steps()
    state.end_epoch({"epoch": 1, "loss": 1.0, "dice_mean": 0.3, "seconds": 5.0})
    out = tmp_path / "run"
    out.mkdir()
    checkpointer = Checkpointer(cfg, out)
    checkpointer.save_best(state.net, 0, 0.3)
    checkpointer.save_last(state)
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "history.json", "last.pt"]  # no temporary files
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    assert best["format"] == "medunet-checkpoint/1" and (best["epoch"], best["dice"]) == (0, 0.3)
    assert best["network"]["features"] == [8, 16, 32] and "optimizer" not in best and "fingerprint" not in best
    assert last["config"]["name"] == "tiny" and last["epoch"] == 0 and last["history"] == state.history
    assert json.loads((out / "history.json").read_text()) == state.history
    for k, v in state.net.state_dict().items():
        assert torch.equal(best["state_dict"][k], v) and torch.equal(last["state_dict"][k], v)


def test_checkpointer_of_another_rank_writes_nothing(tiny_config: Path, tmp_path: Path) -> None:
    state = state_after_steps()
    state.end_epoch({"epoch": 1, "loss": 1.0, "dice_mean": 0.3, "seconds": 5.0})
    out = tmp_path / "run"
    out.mkdir()
    checkpointer = Checkpointer(load_config(tiny_config), out, writes=False)
    checkpointer.save_best(state.net, 0, 0.3)
    checkpointer.save_last(state)
    assert not list(out.iterdir())


def test_checkpoints_carry_the_training_fingerprint(tiny_config: Path, tmp_path: Path) -> None:
    fingerprint = tmp_path / "fingerprint.json"
    fingerprint.write_text('{"cases": []}')
    cfg = load_config(tiny_config, {"data.fingerprint": str(fingerprint)})
    out = tmp_path / "run"
    out.mkdir()
    Checkpointer(cfg, out).save_best(state_after_steps().net, 0, 0.3)
    assert load_checkpoint(out / "best.pt")["fingerprint"] == '{"cases": []}'
