"""The training loop: DiceCE, per-class validation Dice, atomic best/last checkpoints, resume, DDP.

The sampler shuffles from ``seed + epoch`` and every training item's random transforms are seeded
from (seed, epoch, item), so a run resumed from the checkpoint of epoch ``e`` draws exactly the
batches an uninterrupted run would have drawn, and N processes under ``torchrun`` draw together
exactly the crops one process draws for the same global batch.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DeepSupervisionLoss
from monai.transforms import Compose
from monai.utils import set_determinism
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from medunet.config import ExperimentConfig, InferConfig, TrainConfig, to_dict
from medunet.data import Case, kfold_by_patient, read_manifest, split_by_patient
from medunet.errors import InputError
from medunet.evaluation import dice_from_counts, overlap_counts
from medunet.io import load_checkpoint, save_checkpoint
from medunet.io.headers import check_pair, read_header
from medunet.io.writers import write_text
from medunet.networks import create_network
from medunet.training.distributed import EpochSampler, barrier, from_main, gather_objects, init_world, sum_across
from medunet.training.losses import GlobalBatchDiceCELoss
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


def model_payload(cfg: ExperimentConfig, model: nn.Module, fingerprint: str | None = None) -> dict[str, Any]:
    """What inference needs and nothing else: network, preprocessing, labels, window and weights, and
    the training data's ``fingerprint`` (JSON text) when the run was planned from a dataset."""
    return {
        **({"fingerprint": fingerprint} if fingerprint is not None else {}),
        "format": CHECKPOINT_FORMAT,
        "network": to_dict(cfg.network),
        "preprocess": to_dict(cfg.preprocess),
        "infer": to_dict(infer_settings(cfg)),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


class JoinedCacheDataset(CacheDataset):
    """A ``CacheDataset`` whose loader threads have all stopped when a bad case's error leaves it.

    MONAI's pool is left with the error while its other threads are still inside torch; the process
    then aborts at exit ("terminate called without an active exception") after the one-line error.
    """

    def _fill_cache(self, indices: list[int] | None = None) -> list:
        if self.cache_num <= 0:
            return []
        pool = ThreadPool(self.num_workers)
        try:
            return list(pool.imap(self._load_cache_item, range(self.cache_num) if indices is None else indices))
        finally:
            pool.terminate()  # drops the loads not yet started
            pool.join()  # and waits for those under way


class SeededCacheDataset(JoinedCacheDataset):
    """A ``CacheDataset`` whose random transforms are seeded from (seed, epoch, item) on every draw.

    Indexed with ``epoch * len(self) + item`` (see ``EpochSampler``), so an item's crop and
    augmentation do not depend on which process or loader worker draws it, nor in what order.
    """

    def __init__(self, data: list[dict[str, Any]], transform: Compose, seed: int) -> None:
        super().__init__(data, transform, num_workers=None, progress=False, copy_cache=False)
        self.seed = seed

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, int | np.integer):
            return super().__getitem__(index)
        epoch, item = divmod(int(index), len(self))
        seed = np.random.SeedSequence([self.seed, epoch, item]).generate_state(1)[0]
        self.transform.set_random_state(seed=int(seed))
        return super().__getitem__(item)


def train(req: TrainRequest, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``req.config`` into ``req.output`` (``best.pt``, ``last.pt``, ``config.yaml``, ``history.json``).

    Under ``torchrun`` every rank calls this; the model is wrapped in DistributedDataParallel, each
    rank trains on its share of every global batch of ``train.batch_size``, validation is split
    across ranks and reduced, and only rank 0 writes files and calls ``on_epoch``.
    """
    cfg, out = req.config, req.output
    tc = cfg.train
    device = resolve_device(req.device)
    world = init_world(device)
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
    if cfg.network.ensemble > 1:
        raise ValueError("network.ensemble is for inference; train the members with --folds K instead")
    if tc.batch_size % world.size:
        raise ValueError(
            f"train.batch_size ({tc.batch_size}) is the global batch and must be a multiple of the "
            f"number of processes ({world.size})"
        )
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    set_determinism(seed=tc.seed)
    net = create_network(cfg.network).to(device)
    memory_format = _memory_format(cfg.network.spatial_dims) if tc.channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)  # type: ignore[call-overload]
    if world.is_main:
        prepare_output(out, weight_bytes(net), resume=req.resume)
    barrier()

    cases = read_manifest(cfg.data.manifest)
    check_headers(cases)
    train_cases, val_cases = select_split(cfg, cases)
    split = {"train": [c.case_id for c in train_cases], "val": [c.case_id for c in val_cases]}
    if world.is_main:
        write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        write_text(out / "split.json", json.dumps(split, indent=1))
    log.info(
        "%d training and %d validation cases (%d/%d patients)%s",
        len(train_cases),
        len(val_cases),
        len({c.patient_id for c in train_cases}),
        len({c.patient_id for c in val_cases}),
        f"; {world.size} processes" if world.distributed else "",
    )

    pre = cfg.preprocess
    volume_dims = 3 if any(c.slice_index is not None for c in cases) else pre.spatial_dims
    train_ds = SeededCacheDataset(
        [c.as_item() for c in train_cases],
        # flattened so the dataset caches every deterministic step (a nested Compose counts as random)
        Compose(
            [
                preprocess_transform(pre, pad_to_patch=True, volume_dims=volume_dims),
                augment_transform(pre, cfg.augment),
            ]
        ).flatten(),
        seed=tc.seed,
    )
    val_share = [c.as_item() for c in val_cases][world.rank :: world.size]
    val_ds = JoinedCacheDataset(
        val_share, preprocess_transform(pre, pad_to_patch=False, volume_dims=volume_dims), progress=False
    )
    sampler = EpochSampler(train_ds, world, seed=tc.seed)
    rank_batch = tc.batch_size // world.size
    loader = DataLoader(
        train_ds,
        batch_size=rank_batch,
        sampler=sampler,
        drop_last=len(sampler) > rank_batch,
        num_workers=tc.num_workers,
        persistent_workers=tc.num_workers > 0,
    )

    optimizer = make_optimizer(tc, net)
    dice_ce = GlobalBatchDiceCELoss()
    loss_fn: nn.Module = DeepSupervisionLoss(dice_ce, weight_mode="exp") if cfg.network.deep_supervision else dice_ce
    autocast_dtype = resolve_precision(tc.precision, device)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)

    history: list[dict[str, Any]] = []
    start_epoch, best, best_epoch, elapsed_before = 0, -1.0, -1, 0.0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if req.resume and last_path.exists():
        state = load_checkpoint(last_path)
        net.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        best, best_epoch = float(state["best_dice"]), int(state["best_epoch"])
        history, elapsed_before = list(state["history"]), float(state["elapsed"])
        if "rng" in state:
            set_rng_state(state["rng"])
        log.info("resuming from %s at epoch %d", last_path, start_epoch)
    elif req.resume:
        log.info("nothing to resume in %s; starting afresh", out)

    model: nn.Module = net
    if world.distributed:
        if device.type == "cuda" and cfg.network.norm == "batch":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        model = typing.cast(nn.Module, torch.compile(model))

    fp_path = cfg.data.fingerprint
    fingerprint = fp_path.read_text() if fp_path is not None and fp_path.is_file() else None  # into each checkpoint
    label_names = pre.label_names[1:]
    steps_per_epoch = max(len(loader), 1)
    t0 = time.monotonic() - elapsed_before
    epoch = start_epoch - 1
    for epoch in range(start_epoch, tc.epochs):
        torch.manual_seed(tc.seed + epoch)
        sampler.set_epoch(epoch)
        model.train()
        losses = []
        shown = req.progress and world.is_main
        for step, batch in enumerate(_progress(loader, f"epoch {epoch + 1}/{tc.epochs}", shown)):
            lr = set_lr(optimizer, tc, _progress_at(tc, epoch + step / steps_per_epoch, t0))
            x, y = batch["image"].to(device, memory_format=memory_format), batch["label"].to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                pred = model(x)
                loss = loss_fn(list(pred.unbind(1)) if pred.dim() == x.dim() + 1 else pred, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.detach())
        mean_loss = float(sum_across(torch.stack(losses).mean()) / world.size) if losses else float("nan")
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": mean_loss, "lr": lr}
        out_of_time = from_main(_no_time_for_another(tc.time_limit_minutes, t0, epoch + 1))
        last_epoch = epoch + 1 == tc.epochs or out_of_time
        if (epoch + 1) % tc.val_every == 0 or last_epoch:
            started = time.monotonic()
            dice = validate(net, val_ds, cfg, device)
            record["val_seconds"] = time.monotonic() - started
            record.update({f"dice_{n}": float(d) for n, d in zip(label_names, dice, strict=True)})
            record["dice_mean"] = float(np.mean(dice))
            if record["dice_mean"] > best:
                best, best_epoch = record["dice_mean"], epoch + 1
                if world.is_main:
                    payload = {**model_payload(cfg, net, fingerprint), "epoch": epoch, "dice": record["dice_mean"]}
                    save_checkpoint(payload, best_path)
        record["seconds"] = time.monotonic() - t0
        history.append(record)
        if world.is_main:
            save_checkpoint(
                {
                    **model_payload(cfg, net, fingerprint),
                    "config": to_dict(cfg),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rng_state(),
                    "epoch": epoch,
                    "best_dice": best,
                    "best_epoch": best_epoch,
                    "history": history,
                    "elapsed": record["seconds"],
                },
                last_path,
            )
            write_text(out / "history.json", json.dumps(history, indent=1))
            log.info("epoch %d  %s", epoch + 1, "  ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
            if on_epoch is not None:
                on_epoch(record)
        if last_epoch:
            break
    barrier()  # the other ranks wait for rank 0's last checkpoint

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


def _memory_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def weight_bytes(net: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in net.parameters())


# last.pt holds the weights and Adam's two moments; while it is replaced the old and the new copy
# coexist; best.pt holds the weights, twice during its replacement. Plus room for logs and pictures.
CHECKPOINT_COPIES = 8
SPARE_BYTES = 64 * 2**20


def prepare_output(out: Path, weights: int, resume: bool = False) -> None:
    """Create ``out`` and prove it writable with room for the checkpoints, before any data is read.

    Files left by a process killed while writing (``.*.tmp*``) are removed: the real files are whole.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise InputError(out, f"output folder is not writable ({exc.strerror or exc})") from None
    for stale in out.glob(".*.tmp*"):
        stale.unlink()
    need = CHECKPOINT_COPIES * weights + SPARE_BYTES
    if resume:  # the checkpoints being replaced are already on the disk
        need -= sum(p.stat().st_size for p in (out / "last.pt", out / "best.pt") if p.exists())
    free = shutil.disk_usage(out).free
    if free < need:
        raise InputError(
            out, f"only {free / 2**20:.0f} MiB free on this disk; checkpoints need about {need / 2**20:.0f} MiB"
        )


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states, as tensors and plain containers."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
