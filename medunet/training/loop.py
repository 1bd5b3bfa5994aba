"""The training loop as a sequence of named steps: prepare the run, split and load the data, start
(or resume) the train state, then epochs of training, validation and checkpoints.

``train`` is the whole sequence. The same code path runs under ``torchrun``: the helpers of
``medunet.training.distributed`` are no-ops in a world of one. Determinism and exact resume are
described in ``medunet.training.data`` (what each step draws) and ``medunet.training.state``.
"""

from __future__ import annotations

import logging
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DeepSupervisionLoss
from monai.utils import set_determinism
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from medunet.config import ExperimentConfig, TrainConfig
from medunet.evaluation import dice_from_counts, overlap_counts
from medunet.networks import create_network
from medunet.training.checkpoints import (
    LAST,
    Checkpointer,
    model_payload,
    prepare_output,
    weight_bytes,
)
from medunet.training.data import Loaders, SeededCacheDataset, build_loaders, select_split, split_cases
from medunet.training.distributed import World, barrier, from_main, gather_objects, init_world, sum_across
from medunet.training.losses import GlobalBatchDiceCELoss
from medunet.training.optim import make_optimizer, set_lr
from medunet.training.state import TrainState
from medunet.transforms.windows import fit_window

# also importable from here, where they lived before the loop was split into steps
__all__ = [
    "Run",
    "SeededCacheDataset",
    "TrainRequest",
    "TrainResult",
    "model_payload",
    "prepare_run",
    "resolve_device",
    "run_epoch",
    "select_split",
    "train",
    "validate",
]

log = logging.getLogger(__name__)

EpochHook = Callable[[dict[str, Any]], None]


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


@dataclass(frozen=True)
class Run:
    """What stays fixed while a run trains: its config and folder, and this process's device and place."""

    config: ExperimentConfig
    output: Path
    device: torch.device
    world: World
    memory_format: torch.memory_format  # of the network's activations
    autocast: torch.dtype | None  # None: float32
    progress: bool  # a progress bar (rank 0 only)
    resume: bool


def train(req: TrainRequest, on_epoch: EpochHook | None = None) -> TrainResult:
    """Train ``req.config`` into ``req.output`` (``best.pt``, ``last.pt``, ``config.yaml``, ``split.json``,
    ``history.json``); with ``req.resume``, continue bitwise from ``last.pt`` where there is one.

    Under ``torchrun`` every rank calls this; the model is wrapped in DistributedDataParallel, each
    rank trains on its share of every global batch of ``train.batch_size``, validation is split
    across ranks and reduced, and only rank 0 writes files and calls ``on_epoch``.
    """
    run, net = prepare_run(req)
    loaders = build_loaders(run.config, split_cases(run.config, run.output, run.world), run.world)
    state = start_state(run, net)
    model, loss_fn = wrap_model(run, net), make_loss(run.config)
    checkpointer = Checkpointer(run.config, run.output, writes=run.world.is_main)
    tc = run.config.train
    t0 = time.monotonic() - state.elapsed  # the run's clock, across resumes
    while state.epochs_done < tc.epochs:
        record = run_epoch(run, model, state, loaders, loss_fn, t0)
        out_of_time = from_main(_no_time_for_another(tc.time_limit_minutes, t0, record["epoch"]))
        last_epoch = record["epoch"] == tc.epochs or out_of_time
        if record["epoch"] % tc.val_every == 0 or last_epoch:
            record.update(validation_record(run, net, loaders.val))
        record["seconds"] = time.monotonic() - t0
        end_epoch(run, state, record, checkpointer, on_epoch)
        if last_epoch:
            break
    barrier()  # the other ranks wait for rank 0's last checkpoint
    return _result(run, state, checkpointer.best_path, t0)


def prepare_run(req: TrainRequest) -> tuple[Run, nn.Module]:
    """Check the request, join the process group, seed everything, build the network and (rank 0) make
    sure the output folder takes the checkpoints, before any data is read. Returns the run and the
    freshly initialised network."""
    cfg, tc = req.config, req.config.train
    device = resolve_device(req.device)
    world = init_world(device)
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
    _check_request(cfg, world)
    autocast = resolve_precision(tc.precision, device)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    set_determinism(seed=tc.seed)
    net = create_network(cfg.network).to(device)
    memory_format = _memory_format(cfg.network.spatial_dims) if tc.channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)  # type: ignore[call-overload]
    if world.is_main:
        prepare_output(req.output, weight_bytes(net), resume=req.resume)
    barrier()
    progress = req.progress and world.is_main
    return Run(cfg, req.output, device, world, memory_format, autocast, progress, req.resume), net


def _check_request(cfg: ExperimentConfig, world: World) -> None:
    if cfg.network.ensemble > 1:
        raise ValueError("network.ensemble is for inference; train the members with --folds K instead")
    if cfg.train.batch_size % world.size:
        raise ValueError(
            f"train.batch_size ({cfg.train.batch_size}) is the global batch and must be a multiple of the "
            f"number of processes ({world.size})"
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: float16 with loss scaling on CUDA for ``auto``; float32 (None) on CPUs
    unless ``bf16`` is asked for (measured slower on CPUs without native bf16, see benchmarks/)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("train.precision fp16 needs a CUDA device; use bf16 or fp32 on CPUs")
        return torch.float16
    if precision == "fp32":
        return None
    raise ValueError(f"unknown train.precision {precision!r}; choose auto, fp32, bf16 or fp16")


def start_state(run: Run, net: nn.Module) -> TrainState:
    """A fresh train state for ``net``, or with ``run.resume`` the one saved in ``last.pt``."""
    optimizer = make_optimizer(run.config.train, net)
    scaler = torch.amp.GradScaler("cuda", enabled=run.autocast == torch.float16)
    last = run.output / LAST
    if run.resume and last.exists():
        state = TrainState.resume(last, net, optimizer, scaler)
        log.info("resuming from %s at epoch %d", last, state.epochs_done)
        return state
    if run.resume:
        log.info("nothing to resume in %s; starting afresh", run.output)
    return TrainState(net, optimizer, scaler)


def wrap_model(run: Run, net: nn.Module) -> nn.Module:
    """``net`` as it trains: under DistributedDataParallel in a world of several (batch norm synchronized
    across GPUs), compiled with ``train.compile``. Its weights stay those of ``net``."""
    model = net
    if run.world.distributed:
        if run.device.type == "cuda" and run.config.network.norm == "batch":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.config.train.compile:
        model = typing.cast(nn.Module, torch.compile(model))
    return model


def make_loss(cfg: ExperimentConfig) -> nn.Module:
    """DiceCE over the global batch; weighted over the decoder's outputs with deep supervision."""
    dice_ce = GlobalBatchDiceCELoss()
    return DeepSupervisionLoss(dice_ce, weight_mode="exp") if cfg.network.deep_supervision else dice_ce


def run_epoch(
    run: Run, model: nn.Module, state: TrainState, loaders: Loaders, loss_fn: nn.Module, t0: float
) -> dict[str, Any]:
    """Train the epoch after ``state.epochs_done``; its record: ``epoch`` (1-based), the mean ``loss``
    over all ranks and the last step's ``lr``."""
    tc, epoch = run.config.train, state.epochs_done
    torch.manual_seed(tc.seed + epoch)
    loaders.sampler.set_epoch(epoch)
    model.train()
    steps_per_epoch = max(len(loaders.train), 1)
    losses: list[torch.Tensor] = []
    lr = float("nan")
    for step, batch in enumerate(_progress(loaders.train, f"epoch {epoch + 1}/{tc.epochs}", run.progress)):
        lr = set_lr(state.optimizer, tc, _progress_at(tc, epoch + step / steps_per_epoch, t0))
        losses.append(train_step(run, model, state, loss_fn, batch))
    mean_loss = float(sum_across(torch.stack(losses).mean()) / run.world.size) if losses else float("nan")
    return {"epoch": epoch + 1, "loss": mean_loss, "lr": lr}


def train_step(
    run: Run, model: nn.Module, state: TrainState, loss_fn: nn.Module, batch: dict[str, Any]
) -> torch.Tensor:
    """One optimizer step on ``batch`` (image ``(B, C, H, W[, D])``, label ``(B, 1, H, W[, D])``); the loss."""
    x, y = batch["image"].to(run.device, memory_format=run.memory_format), batch["label"].to(run.device)
    with torch.autocast(run.device.type, dtype=run.autocast, enabled=run.autocast is not None):
        pred = model(x)
        loss = loss_fn(list(pred.unbind(1)) if pred.dim() == x.dim() + 1 else pred, y)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return loss.detach()


def validation_record(run: Run, net: nn.Module, dataset: CacheDataset) -> dict[str, float]:
    """``val_seconds``, ``dice_<class>`` for every foreground class and their ``dice_mean``."""
    started = time.monotonic()
    dice = validate(net, dataset, run.config, run.device)
    names = run.config.preprocess.label_names[1:]
    return {
        "val_seconds": time.monotonic() - started,
        **{f"dice_{n}": float(d) for n, d in zip(names, dice, strict=True)},
        "dice_mean": float(np.mean(dice)),
    }


@torch.no_grad()
def validate(model: nn.Module, dataset: CacheDataset, cfg: ExperimentConfig, device: torch.device) -> np.ndarray:
    """Mean Dice per foreground class over validation volumes (sliding window, Gaussian blending).

    Slices of one volume (a 2D view of 3D scans) are pooled, so the Dice is that of the volume. Under
    torchrun each rank scores its share of ``dataset`` and the counts are pooled across ranks.
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
    pooled: dict[str, np.ndarray] = {}
    for share in gather_objects(counts):
        for volume, c in share.items():
            pooled[volume] = pooled.get(volume, 0) + c
    return np.mean([dice_from_counts(pooled[v]) for v in sorted(pooled)], axis=0)


def end_epoch(
    run: Run, state: TrainState, record: dict[str, Any], checkpointer: Checkpointer, on_epoch: EpochHook | None
) -> None:
    """Add ``record`` to the state; (rank 0) save ``best.pt`` when it is the best so far, then ``last.pt``
    and ``history.json``, log the epoch and call ``on_epoch``."""
    if state.end_epoch(record):
        checkpointer.save_best(state.net, record["epoch"] - 1, record["dice_mean"])
    checkpointer.save_last(state)
    if run.world.is_main:
        log.info("epoch %d  %s", record["epoch"], "  ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
        if on_epoch is not None:
            on_epoch(record)


def _result(run: Run, state: TrainState, best_checkpoint: Path, t0: float) -> TrainResult:
    names = run.config.preprocess.label_names[1:]
    final = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
    return TrainResult(
        output=run.output,
        best_checkpoint=best_checkpoint,
        best_dice=state.best_dice,
        best_epoch=state.best_epoch,
        class_dice={n: float(final.get(f"dice_{n}", float("nan"))) for n in names},
        epochs_run=state.epochs_done,
        seconds=time.monotonic() - t0,
    )


def _memory_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def _progress_at(tc: TrainConfig, epochs_done: float, t0: float) -> float:
    """Share of the run done: by epochs, or by the clock with ``schedule_by_time`` (and a time limit)."""
    if tc.schedule_by_time and tc.time_limit_minutes:
        return min((time.monotonic() - t0) / (tc.time_limit_minutes * 60), 1.0)
    return min(epochs_done / tc.epochs, 1.0)


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
