"""A run's data: the patient-wise split, and the seeded training loader and validation set.

Every training item's random transforms are seeded from (seed, epoch, item), and the sampler
shuffles from ``seed + epoch`` (``EpochSampler``), so a resumed run draws the batches an
uninterrupted one would have drawn, and N processes under ``torchrun`` draw together exactly the
crops one process draws for the same global batch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose

from medunet.config import ExperimentConfig, to_dict
from medunet.data import Case, kfold_by_patient, read_manifest, split_by_patient
from medunet.io.headers import check_pair, read_header
from medunet.io.writers import write_text
from medunet.training.distributed import EpochSampler, World
from medunet.transforms import preprocess_transform, training_transform

log = logging.getLogger(__name__)


def select_split(cfg: ExperimentConfig, cases: list[Case]) -> tuple[list[Case], list[Case]]:
    d = cfg.data
    if d.fold is not None:
        return kfold_by_patient(cases, d.folds, d.fold, d.split_seed)
    return split_by_patient(cases, d.val_fraction, d.split_seed)


def check_headers(cases: list[Case], channels: int = 1) -> None:
    """Every file readable and every label on its image's grid, from headers, before any caching.
    ``channels``: how many the configuration reads; a single image file may hold them all (4D)."""
    seen: set[Path] = set()
    for case in cases:
        if case.images[0] in seen:  # slices of one volume
            continue
        seen.add(case.images[0])
        for image in case.images:
            read_header(image)
        if case.label is not None:
            check_pair(case.images[0], case.label, channels if len(case.images) == 1 else 1)


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

    def __init__(self, data: list[dict[str, Any]], transform: Compose, seed: int, cache_rate: float = 1.0) -> None:
        super().__init__(data, transform, cache_rate=cache_rate, num_workers=None, progress=False, copy_cache=False)
        self.seed = seed

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, int | np.integer):
            return super().__getitem__(index)
        epoch, item = divmod(int(index), len(self))
        seed = np.random.SeedSequence([self.seed, epoch, item]).generate_state(1)[0]
        self.transform.set_random_state(seed=int(seed))
        return super().__getitem__(item)


@dataclass(frozen=True)
class Split:
    train: list[Case]
    val: list[Case]
    slices: bool = False  # the manifest lists slices of volumes (a 2D view of 3D scans)


def split_cases(cfg: ExperimentConfig, output: Path, world: World) -> Split:
    """Read and check the manifest, split it by patient, and (rank 0) write ``config.yaml`` and
    ``split.json`` (case ids only) into ``output``."""
    cases = read_manifest(cfg.data.manifest)
    check_headers(cases, len(cfg.preprocess.channels))
    train_cases, val_cases = select_split(cfg, cases)
    split = {"train": [c.case_id for c in train_cases], "val": [c.case_id for c in val_cases]}
    if world.is_main:
        write_text(output / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        write_text(output / "split.json", json.dumps(split, indent=1))
    log.info(
        "%d training and %d validation cases (%d/%d patients)%s",
        len(train_cases),
        len(val_cases),
        len({c.patient_id for c in train_cases}),
        len({c.patient_id for c in val_cases}),
        f"; {world.size} processes" if world.distributed else "",
    )
    return Split(train_cases, val_cases, slices=any(c.slice_index is not None for c in cases))


@dataclass(frozen=True)
class Loaders:
    train: DataLoader  # this rank's share of every global batch, indexed through ``sampler``
    sampler: EpochSampler
    val: CacheDataset  # this rank's share of the validation volumes, preprocessed


def build_loaders(cfg: ExperimentConfig, split: Split, world: World) -> Loaders:
    """The cached, seeded training loader and the cached validation set of this rank."""
    pre, tc = cfg.preprocess, cfg.train
    volume_dims = 3 if split.slices else pre.spatial_dims
    train_ds = SeededCacheDataset(
        [c.as_item() for c in split.train],
        training_transform(pre, cfg.augment, volume_dims),
        seed=tc.seed,
        cache_rate=cfg.data.cache_rate,
    )
    val_share = [c.as_item() for c in split.val][world.rank :: world.size]
    val_ds = JoinedCacheDataset(
        val_share,
        preprocess_transform(pre, pad_to_patch=False, volume_dims=volume_dims),
        cache_rate=cfg.data.cache_rate,
        progress=False,
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
        # the workers' base seed comes from a generator of the loader's own, not torch's global one:
        # persistent workers draw it once, a loader without workers every epoch, and a run's random
        # stream (dropout) must not depend on which
        generator=torch.Generator().manual_seed(tc.seed),
    )
    return Loaders(loader, sampler, val_ds)
