"""The training loop: DiceCE, per-class validation Dice, atomic best/last checkpoints, resume.

Every epoch reseeds the sampler and the augmentation from ``seed + epoch``, so a run resumed from
the checkpoint of epoch ``e`` draws exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.transforms import Compose
from monai.utils import set_determinism
from torch import nn

from medunet.config import ExperimentConfig, InferConfig, to_dict
from medunet.data import Case, kfold_by_patient, read_manifest, split_by_patient
from medunet.evaluation import dice_from_counts, overlap_counts
from medunet.io import load_checkpoint, save_checkpoint
from medunet.io.headers import check_pair, read_header
from medunet.io.writers import atomic_path
from medunet.networks import create_network
from medunet.training.optim import make_optimizer, set_lr
from medunet.transforms import augment_transform, preprocess_transform
from medunet.transforms.windows import fit_window

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "medunet-checkpoint/1"


@dataclass(frozen=True)
class TrainRequest:
    config: ExperimentConfig
    output: Path
    resume: bool = False
    device: str = "auto"
    progress: bool = True


@dataclass(frozen=True)
class TrainResult:
    output: Path
    best_checkpoint: Path
    best_dice: float
    best_epoch: int
    class_dice: dict[str, float]
    epochs_run: int
    seconds: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def select_split(cfg: ExperimentConfig, cases: list[Case]) -> tuple[list[Case], list[Case]]:
    d = cfg.data
    if d.fold is not None:
        return kfold_by_patient(cases, d.folds, d.fold, d.split_seed)
    return split_by_patient(cases, d.val_fraction, d.split_seed)


def check_headers(cases: list[Case]) -> None:
    """Every file readable and every label on its image's grid, from headers, before any caching."""
    seen: set[Path] = set()
    for case in cases:
        if case.images[0] in seen:  # slices of one volume
            continue
        seen.add(case.images[0])
        for image in case.images:
            read_header(image)
        if case.label is not None:
            check_pair(case.images[0], case.label)


def infer_settings(cfg: ExperimentConfig) -> InferConfig:
    """The run's inference settings; mirroring for ``--tta`` only along the axes training flipped."""
    if cfg.infer.tta_axes or cfg.augment.flip_prob <= 0:
        return cfg.infer
    return replace(cfg.infer, tta_axes=tuple(cfg.augment.flip_axes))


def model_payload(cfg: ExperimentConfig, model: nn.Module) -> dict[str, Any]:
    """What inference needs and nothing else: network, preprocessing, labels, window and weights."""
    return {
        "format": CHECKPOINT_FORMAT,
        "network": to_dict(cfg.network),
        "preprocess": to_dict(cfg.preprocess),
        "infer": to_dict(infer_settings(cfg)),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def train(req: TrainRequest, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``req.config`` into ``req.output`` (``best.pt``, ``last.pt``, ``config.yaml``, ``history.json``)."""
    cfg, out = req.config, req.output
    tc = cfg.train
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp*"):  # left by a process killed while writing; the real files are whole
        stale.unlink()
    device = resolve_device(req.device)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    set_determinism(seed=tc.seed)

    cases = read_manifest(cfg.data.manifest)
    check_headers(cases)
    train_cases, val_cases = select_split(cfg, cases)
    _write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    split = {"train": [c.case_id for c in train_cases], "val": [c.case_id for c in val_cases]}
    _write_text(out / "split.json", json.dumps(split, indent=1))
    log.info(
        "%d training and %d validation cases (%d/%d patients)",
        len(train_cases),
        len(val_cases),
        len({c.patient_id for c in train_cases}),
        len({c.patient_id for c in val_cases}),
    )

    pre = cfg.preprocess
    volume_dims = 3 if any(c.slice_index is not None for c in cases) else pre.spatial_dims
    augment = augment_transform(pre, cfg.augment)
    train_ds = CacheDataset(
        [c.as_item() for c in train_cases],
        # flattened so the dataset caches every deterministic step (a nested Compose counts as random)
        Compose([preprocess_transform(pre, pad_to_patch=True, volume_dims=volume_dims), augment]).flatten(),
        num_workers=None,
        progress=False,
        copy_cache=False,
    )
    val_ds = CacheDataset(
        [c.as_item() for c in val_cases],
        preprocess_transform(pre, pad_to_patch=False, volume_dims=volume_dims),
        num_workers=None,
        progress=False,
    )
    generator = torch.Generator()
    loader = DataLoader(
        train_ds,
        batch_size=tc.batch_size,
        shuffle=True,
        drop_last=len(train_ds) > tc.batch_size,
        num_workers=tc.num_workers,
        generator=generator,
        persistent_workers=tc.num_workers > 0,
    )

    model = create_network(cfg.network).to(device)
    optimizer = make_optimizer(tc, model)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    loss_fn: nn.Module = DeepSupervisionLoss(dice_ce, weight_mode="exp") if cfg.network.deep_supervision else dice_ce
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    history: list[dict[str, Any]] = []
    start_epoch, best, best_epoch, elapsed_before = 0, -1.0, -1, 0.0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if req.resume and last_path.exists():
        state = load_checkpoint(last_path)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        best, best_epoch = float(state["best_dice"]), int(state["best_epoch"])
        history, elapsed_before = list(state["history"]), float(state["elapsed"])
        log.info("resuming from %s at epoch %d", last_path, start_epoch)
    elif req.resume:
        log.info("nothing to resume in %s; starting afresh", out)

    label_names = pre.label_names[1:]
    steps_per_epoch = max(len(loader), 1)
    t0 = time.monotonic() - elapsed_before
    epoch = start_epoch - 1
    for epoch in range(start_epoch, tc.epochs):
        torch.manual_seed(tc.seed + epoch)
        generator.manual_seed(tc.seed + epoch)
        augment.set_random_state(seed=tc.seed + epoch)
        model.train()
        losses = []
        for step, batch in enumerate(_progress(loader, f"epoch {epoch + 1}/{tc.epochs}", req.progress)):
            lr = set_lr(optimizer, tc, (epoch + step / steps_per_epoch) / tc.epochs)
            x, y = batch["image"].to(device), batch["label"].to(device)
            with torch.autocast(device.type, enabled=use_amp):
                pred = model(x)
                loss = loss_fn(list(pred.unbind(1)) if pred.dim() == x.dim() + 1 else pred, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": lr}
        last_epoch = epoch + 1 == tc.epochs or _no_time_for_another(tc.time_limit_minutes, t0, epoch + 1)
        if (epoch + 1) % tc.val_every == 0 or last_epoch:
            dice = validate(model, val_ds, cfg, device)
            record.update({f"dice_{n}": float(d) for n, d in zip(label_names, dice, strict=True)})
            record["dice_mean"] = float(np.mean(dice))
            if record["dice_mean"] > best:
                best, best_epoch = record["dice_mean"], epoch + 1
                save_checkpoint({**model_payload(cfg, model), "epoch": epoch, "dice": record["dice_mean"]}, best_path)
        record["seconds"] = time.monotonic() - t0
        history.append(record)
        save_checkpoint(
            {
                **model_payload(cfg, model),
                "config": to_dict(cfg),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "best_dice": best,
                "best_epoch": best_epoch,
                "history": history,
                "elapsed": record["seconds"],
            },
            last_path,
        )
        _write_text(out / "history.json", json.dumps(history, indent=1))
        log.info("epoch %d  %s", epoch + 1, "  ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
        if on_epoch is not None:
            on_epoch(record)
        if last_epoch:
            break

    final = next((h for h in history if h["epoch"] == best_epoch), {})
    return TrainResult(
        output=out,
        best_checkpoint=best_path,
        best_dice=best,
        best_epoch=best_epoch,
        class_dice={n: float(final.get(f"dice_{n}", float("nan"))) for n in label_names},
        epochs_run=epoch + 1,
        seconds=time.monotonic() - t0,
    )


@torch.no_grad()
def validate(model: nn.Module, dataset: CacheDataset, cfg: ExperimentConfig, device: torch.device) -> np.ndarray:
    """Mean Dice per foreground class over validation volumes (sliding window, Gaussian blending).

    Slices of one volume (a 2D view of 3D scans) are pooled, so the Dice is that of the volume.
    """
    model.eval()
    roi = cfg.infer.roi_size or cfg.preprocess.patch_size
    counts: dict[str, np.ndarray] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        image = item["image"][None].to(device)
        window = fit_window(roi, image.shape[2:], cfg.preprocess.patch_size)
        logits = sliding_window_inference(
            image, window, cfg.infer.sw_batch_size, model, overlap=cfg.infer.overlap, mode=cfg.infer.mode
        )
        pred = torch.as_tensor(logits).argmax(1)[0].cpu()
        c = overlap_counts(pred, item["label"][0].cpu(), cfg.preprocess.num_classes)
        counts[item["volume_id"]] = counts.get(item["volume_id"], 0) + c
    model.train()
    return np.mean([dice_from_counts(c) for c in counts.values()], axis=0)


def _no_time_for_another(limit_minutes: float | None, t0: float, epochs_done: int) -> bool:
    """True when another epoch (at this run's mean pace) would end past ``time_limit_minutes``."""
    if limit_minutes is None:
        return False
    elapsed = time.monotonic() - t0
    return elapsed + elapsed / max(epochs_done, 1) > limit_minutes * 60


def _progress(loader: DataLoader, description: str, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return loader
    from rich.progress import track

    return track(loader, description=description, transient=True)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
