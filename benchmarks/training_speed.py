"""Time to Dice: medunet's default 3D recipe against MONAI's stock recipe, same data, same machine, one run.

    python benchmarks/training_speed.py [--minutes 15] [--order stock,medunet] [--json out.json]
    python benchmarks/training_speed.py --choices     # per-step cost of each training-speed option

Both recipes train on the msd_hippocampus manifest with the same patient-wise split (that of
``configs/hippocampus_3d.yaml``: 160 training and 40 validation patients) for the same training
wall-clock budget, one after the other in this process, and are scored by the same Dice (per volume
and class on the validation patients, mean over volumes; ``medunet.evaluation``). The clock of each
stops while it validates, so the budget buys training only.

- stock: MONAI ``UNet`` (channels 16-256, strides 2, 2 residual units, MONAI's default instance norm),
  ``DiceCELoss(to_onehot_y=True, softmax=True)``, Adam 1e-3, ``CacheDataset`` of oriented, z-scored,
  padded volumes, ``RandCropByPosNegLabeld`` 48x64x48 (pos 1 : neg 1), batch 8; validation with
  ``sliding_window_inference`` (48x64x48, sw_batch_size 4) after every epoch;
- medunet: ``medunet.training.train`` on ``configs/hippocampus_3d.yaml`` as shipped, validating every
  epoch, with its time limit set to the budget.

Printed: validation Dice over training time for both, the training minutes to reach mean Dice 0.85
and 0.88, and training images (crops) per second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "hippocampus_3d.yaml"
TARGETS = (0.85, 0.88)


def split_cases() -> tuple[Any, list[Any], list[Any]]:
    from medunet.config import load_config
    from medunet.data import read_manifest
    from medunet.training.loop import select_split

    cfg = load_config(CONFIG)
    train_cases, val_cases = select_split(cfg, read_manifest(cfg.data.manifest))
    return cfg, train_cases, val_cases


def run_stock(minutes: float, threads: int) -> dict[str, Any]:
    from monai.data import CacheDataset, DataLoader
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        RandCropByPosNegLabeld,
        SpatialPadd,
    )
    from monai.utils import set_determinism

    from medunet.evaluation import dice_from_counts, overlap_counts

    torch.set_num_threads(threads)
    set_determinism(seed=0)
    _, train_cases, val_cases = split_cases()
    roi = (48, 64, 48)
    keys = ["image", "label"]
    base = [
        LoadImaged(keys),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS"),
        NormalizeIntensityd("image"),
    ]
    train_tf = Compose([*base, SpatialPadd(keys, roi), RandCropByPosNegLabeld(keys, "label", roi, pos=1, neg=1)])
    items = [{"image": str(c.images[0]), "label": str(c.label)} for c in train_cases]
    train_ds = CacheDataset(items, train_tf, progress=False)
    val_ds = CacheDataset(
        [{"image": str(c.images[0]), "label": str(c.label)} for c in val_cases], Compose(base), progress=False
    )
    loader = DataLoader(train_ds, batch_size=8, shuffle=True, num_workers=0)
    model = UNet(3, 1, 3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)

    def validate() -> np.ndarray:
        model.eval()
        scores = []
        with torch.no_grad():
            for i in range(len(val_ds)):
                item = val_ds[i]
                logits = sliding_window_inference(item["image"][None], roi, 4, model)
                counts = overlap_counts(torch.as_tensor(logits).argmax(1)[0], torch.as_tensor(item["label"][0]), 3)
                scores.append(dice_from_counts(counts))
        model.train()
        return np.mean(scores, axis=0)

    curve, images, trained, epoch = [], 0, 0.0, 0
    while trained < minutes * 60:
        epoch += 1
        started = time.monotonic()
        for batch in loader:
            loss = loss_fn(model(batch["image"]), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += batch["image"].shape[0]
            if trained + time.monotonic() - started >= minutes * 60:
                break
        trained += time.monotonic() - started
        dice = validate()
        curve.append(_point(epoch, trained, dice))
        _show("stock", curve[-1])
    return {"curve": curve, "images_per_second": images / trained, "images": images}


def run_medunet(minutes: float, threads: int) -> dict[str, Any]:
    from medunet.config import load_config
    from medunet.training import TrainRequest, train

    cfg = load_config(CONFIG, {"train.val_every": 1, "train.num_threads": threads})
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, time_limit_minutes=minutes))
    import tempfile

    curve: list[dict[str, Any]] = []
    val_total = 0.0

    def on_epoch(record: dict[str, Any]) -> None:
        nonlocal val_total
        val_total += record.get("val_seconds", 0.0)
        if "dice_mean" in record:
            dice = np.array([record["dice_anterior"], record["dice_posterior"]])
            curve.append(_point(record["epoch"], record["seconds"] - val_total, dice))
            _show("medunet", curve[-1])

    with tempfile.TemporaryDirectory() as out:
        result = train(TrainRequest(cfg, Path(out), device="cpu", progress=False), on_epoch=on_epoch)
    trained = curve[-1]["minutes"] * 60 if curve else float("nan")
    crops_per_epoch = (len(split_cases()[1]) // cfg.train.batch_size) * cfg.train.batch_size
    images = crops_per_epoch * cfg.augment.crop_samples * result.epochs_run
    return {"curve": curve, "images_per_second": images / trained, "images": images}


def _point(epoch: int, seconds: float, dice: np.ndarray) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "minutes": seconds / 60,
        "dice_anterior": float(dice[0]),
        "dice_posterior": float(dice[1]),
        "dice_mean": float(np.mean(dice)),
    }


def _show(name: str, p: dict[str, Any]) -> None:
    print(
        f"{name:8s} epoch {p['epoch']:3d}  {p['minutes']:6.2f} min  Dice {p['dice_mean']:.4f} "
        f"(anterior {p['dice_anterior']:.4f}, posterior {p['dice_posterior']:.4f})",
        flush=True,
    )


def time_to(curve: list[dict[str, Any]], target: float) -> float | None:
    return next((p["minutes"] for p in curve if p["dice_mean"] >= target), None)


def measure_choices(threads: int, steps: int = 10) -> dict[str, float]:
    """Milliseconds per training step of the default recipe's network (batch 2 of 40x56x40) per option."""
    from medunet.config import load_config
    from medunet.networks import create_network
    from medunet.training.losses import GlobalBatchDiceCELoss

    torch.set_num_threads(threads)
    cfg = load_config(CONFIG)
    results = {}
    options = {
        "float32, contiguous": {},
        "float32, channels_last_3d": {"channels_last": True},
        "bf16 autocast": {"bf16": True},
        "torch.compile": {"compile": True},
        "torch.compile + channels_last_3d": {"compile": True, "channels_last": True},
    }
    for name, opt in options.items():
        torch.manual_seed(0)
        net = create_network(cfg.network)
        optimizer = torch.optim.AdamW(net.parameters(), 2e-3)
        loss_fn = GlobalBatchDiceCELoss()
        x, y = torch.randn(2, 1, 40, 56, 40), torch.randint(0, 3, (2, 1, 40, 56, 40))
        if opt.get("channels_last"):
            net = net.to(memory_format=torch.channels_last_3d)
            x = x.to(memory_format=torch.channels_last_3d)
        model = torch.compile(net) if opt.get("compile") else net
        n = 4 if opt.get("bf16") else steps
        times = []
        for _ in range(n):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(opt.get("bf16"))):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - t)
        steady = float(np.mean(times[2:])) * 1000
        results[name] = steady
        print(f"{name:34s} first step {times[0]:6.2f} s, then {steady:7.0f} ms/step", flush=True)
    from monai.transforms import Compose

    from medunet.training.loop import SeededCacheDataset
    from medunet.transforms import training_transform

    _, train_cases, _ = split_cases()
    items = [c.as_item() for c in train_cases[:40]]
    tf = training_transform(cfg.preprocess, cfg.augment)
    # MONAI's default: the same steps, with metadata tracked through the random ones
    *cached, random_steps = tf.transforms
    tracked = Compose([*cached, *random_steps.transforms])
    variants = {"augmentation per crop": tf, "augmentation per crop, metadata tracked": tracked}
    for name, transform in variants.items():
        ds = SeededCacheDataset(items, transform, seed=0)
        for i in range(len(ds)):  # once untimed: the first draws build caches of their own
            ds[i]
        t = time.perf_counter()
        for _ in range(3):
            for i in range(len(ds)):
                ds[i]
        results[name] = (time.perf_counter() - t) / (3 * len(ds)) * 1000
        print(f"{name:40s} {results[name]:7.1f} ms", flush=True)
    ratio = results["augmentation per crop, metadata tracked"] / results["augmentation per crop"]
    print(f"{'metadata-free augmentation, speed-up':40s} {ratio:7.2f}x", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget per recipe")
    parser.add_argument("--order", default="stock,medunet", help="which recipes, in which order")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--choices", action="store_true", help="only measure the per-step cost of each option")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.threads} threads, budget {args.minutes:g} min per recipe", flush=True)
    if args.choices:
        results: dict[str, Any] = measure_choices(args.threads)
    else:
        runners = {"stock": run_stock, "medunet": run_medunet}
        results = {}
        for name in args.order.split(","):
            results[name] = runners[name](args.minutes, args.threads)
        print()
        for name, r in results.items():
            reach = "  ".join(
                f"Dice {t}: {m:.1f} min" if (m := time_to(r["curve"], t)) is not None else f"Dice {t}: not reached"
                for t in TARGETS
            )
            best = max(r["curve"], key=lambda p: p["dice_mean"])
            print(
                f"{name:8s} {reach}  best {best['dice_mean']:.4f} at {best['minutes']:.1f} min  "
                f"{r['images_per_second']:.2f} images/s"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    sys.exit(0)


if __name__ == "__main__":
    main()
