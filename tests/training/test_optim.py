"""Optimizer and learning-rate schedule: which optimizer a config builds, the factor at known points of the
run (warm-up, cosine, poly, constant), and the errors for names that are not offered."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
from torch import nn

from medunet.config import ConfigError, TrainConfig, load_config
from medunet.training.optim import lr_factor, make_optimizer, set_lr


def net() -> nn.Module:
    return nn.Sequential(nn.Conv3d(1, 4, 3), nn.InstanceNorm3d(4, affine=True), nn.Conv3d(4, 2, 1))


@pytest.mark.parametrize(
    ("name", "cls"), [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)]
)
def test_optimizer_takes_every_parameter_with_the_configured_lr_and_decay(name: str, cls: type) -> None:
    model = net()
    opt = make_optimizer(TrainConfig(optimizer=name, learning_rate=0.03, weight_decay=0.002), model)
    assert type(opt) is cls
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["lr"] == 0.03 and group["weight_decay"] == 0.002
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


def test_sgd_is_nesterov_with_high_momentum() -> None:
    group = make_optimizer(TrainConfig(optimizer="sgd"), net()).param_groups[0]
    assert group["momentum"] == 0.99 and group["nesterov"] is True


def test_unknown_optimizer_is_refused_with_the_config_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"train.optimizer: 'lbfgs' is not one of \['adamw', 'adam', 'sgd'\]"):
        TrainConfig(optimizer="lbfgs")


def test_cosine_runs_from_one_to_the_floor() -> None:
    cfg = TrainConfig(scheduler="cosine", epochs=10)
    assert lr_factor(cfg, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 0.5) == pytest.approx(0.51)  # half-way between 1 and the 0.02 floor
    assert lr_factor(cfg, 1.0) == pytest.approx(0.02)
    # a cosine is point-symmetric about the half-way point
    for p in (0.1, 0.25, 0.4):
        assert lr_factor(cfg, p) + lr_factor(cfg, 1.0 - p) == pytest.approx(1.02)
    values = [lr_factor(cfg, i / 100) for i in range(101)]
    assert all(a > b for a, b in pairwise(values))


def test_poly_decays_with_power_0_9_to_the_floor() -> None:
    cfg = TrainConfig(scheduler="poly", epochs=10)
    assert lr_factor(cfg, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 0.5) == pytest.approx(0.535887, abs=1e-6)  # 0.5 ** 0.9
    assert lr_factor(cfg, 0.9) == pytest.approx(0.125893, abs=1e-6)  # 0.1 ** 0.9
    assert lr_factor(cfg, 0.99) == pytest.approx(0.02)  # 0.01 ** 0.9 = 0.016 is below the floor
    assert lr_factor(cfg, 1.0) == pytest.approx(0.02)


def test_constant_is_one_everywhere() -> None:
    cfg = TrainConfig(scheduler="constant", epochs=10)
    assert [lr_factor(cfg, p) for p in (0.0, 0.3, 0.999, 1.0)] == [1.0, 1.0, 1.0, 1.0]


def test_warmup_ramps_linearly_then_the_decay_starts_from_one() -> None:
    cfg = TrainConfig(scheduler="cosine", epochs=10, warmup_epochs=2)  # warm-up over the first 20% of the run
    assert lr_factor(cfg, 0.0) == pytest.approx(0.005)  # never exactly zero: the first steps still move
    assert lr_factor(cfg, 0.05) == pytest.approx(0.255)
    assert lr_factor(cfg, 0.1) == pytest.approx(0.505)
    assert lr_factor(cfg, 0.1995) == pytest.approx(1.0)  # capped at one (0.2005 / 0.2 would be 1.0025)
    assert lr_factor(cfg, 0.2) == pytest.approx(1.0)
    assert lr_factor(cfg, 0.6) == pytest.approx(0.51)  # half-way through the decay, not through the run
    assert lr_factor(cfg, 1.0) == pytest.approx(0.02)
    constant = TrainConfig(scheduler="constant", epochs=10, warmup_epochs=5)
    assert lr_factor(constant, 0.25) == pytest.approx(0.502)
    assert lr_factor(constant, 0.75) == 1.0


def test_progress_past_the_end_stays_at_the_floor() -> None:
    for scheduler in ("cosine", "poly"):
        cfg = TrainConfig(scheduler=scheduler, epochs=4, warmup_epochs=1)
        assert lr_factor(cfg, 1.5) == pytest.approx(0.02)


def test_unknown_scheduler_is_refused_before_training_not_after_the_warm_up(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"train.scheduler: 'step' is not one of \['cosine', 'poly', 'constant'\]"):
        TrainConfig(scheduler="step", warmup_epochs=2, epochs=10)
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  scheduler: step\n  warmup_epochs: 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml:train:scheduler: 'step' is not one of"):
        load_config(path)


def test_set_lr_sets_every_group_and_returns_the_lr() -> None:
    model = net()
    cfg = TrainConfig(scheduler="cosine", epochs=10, learning_rate=0.1)
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 5.0}], lr=1.0)
    lr = set_lr(opt, cfg, 0.5)
    assert lr == pytest.approx(0.051)
    assert [g["lr"] for g in opt.param_groups] == [lr, lr]
    assert set_lr(opt, cfg, 1.0) == pytest.approx(0.002)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.002, 0.002])
