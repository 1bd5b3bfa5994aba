"""torchrun: two gloo processes on real scans train what one process trains for the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.losses import DiceCELoss

from medunet.io import load_checkpoint
from medunet.training.losses import GlobalBatchDiceCELoss

REAL_YAML = """
name: ddp_check
data: {{manifest: {manifest}, val_fraction: 0.25, split_seed: 0}}
preprocess:
  spatial_dims: 3
  label_names: [background, anterior, posterior]
  normalization: zscore
  patch_size: [24, 32, 24]
augment: {{crop_samples: 1, rotate_prob: 0.3, intensity_prob: 0.3, flip_prob: 0.3, flip_axes: [0]}}
network: {{name: unet, spatial_dims: 3, out_channels: 3, features: [8, 16, 32]}}
train: {{epochs: 2, batch_size: 4, learning_rate: 0.005, seed: 0, num_threads: 1}}
infer: {{overlap: 0.25, sw_batch_size: 1}}
"""


def test_loss_is_monai_dice_ce_in_one_process() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 10, 12, 8, requires_grad=True)
    target = torch.randint(0, 4, (3, 1, 10, 12, 8))
    ours = GlobalBatchDiceCELoss()(logits, target)
    (g_ours,) = torch.autograd.grad(ours, logits)
    reference = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)(logits, target)
    (g_ref,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(g_ours, g_ref)


@pytest.fixture
def real_config(data_dir: Path, tmp_path: Path) -> Path:
    images = sorted((data_dir / "msd_hippocampus" / "images").glob("*.nii.gz"))[:16]
    rows = ["image,label,patient_id"]
    rows += [f"{p},{p.parent.parent / 'labels' / p.name},{p.name.split('.')[0]}" for p in images]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "real.yaml"
    cfg.write_text(REAL_YAML.format(manifest="m.csv"))
    return cfg


def _train(cfg: Path, out: Path, processes: int, *extra: str) -> subprocess.CompletedProcess[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m"]
    cmd = [*(launcher if processes > 1 else [sys.executable, "-m"]), "medunet", "train", "-c", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*cmd, "-o", str(out), "--no-tracking", "-q", *extra], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.slow
def test_two_gloo_processes_match_one(real_config: Path, tmp_path: Path) -> None:
    one = _train(real_config, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr
    two = _train(real_config, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("best mean Dice") == 1  # only rank 0 reports

    a, b = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    assert [h["epoch"] for h in b["history"]] == [1, 2]
    for ha, hb in zip(a["history"], b["history"], strict=True):
        # the first epoch's loss agrees to float rounding; Adam amplifies rounding a little after that
        assert abs(ha["loss"] - hb["loss"]) < 1e-3 * abs(ha["loss"])
    assert abs(a["history"][-1]["dice_mean"] - b["history"][-1]["dice_mean"]) < 0.01
    for key, wa in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], wa, atol=2e-2, rtol=0)
    assert json.loads((tmp_path / "two" / "split.json").read_text()) == json.loads(
        (tmp_path / "one" / "split.json").read_text()
    )


def test_global_batch_must_split_evenly(real_config: Path, tmp_path: Path) -> None:
    proc = _train(real_config, tmp_path / "odd", 2, "--set", "train.batch_size=3")
    assert proc.returncode != 0
    assert "train.batch_size (3) is the global batch and must be a multiple of the number of processes (2)" in (
        proc.stderr
    )
