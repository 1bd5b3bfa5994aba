"""Typed configuration: frozen dataclasses and the YAML loader.

This is the only place where raw dicts become types. Relative paths in a config file are resolved
against the folder that holds the file, so a config works from any working directory.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml


class Normalization(StrEnum):
    ZSCORE = "zscore"  # MR: zero mean, unit variance (inside the non-zero region when `nonzero`)
    CT = "ct"  # CT: clip to a HU window, scale to [0, 1]
    CT_ZSCORE = "ct_zscore"  # CT: clip to ``ct_window`` (foreground percentiles), z-score with ``ct_stats``
    PERCENTILE = "percentile"  # clip to the 0.5/99.5 percentiles, scale to [0, 1] (EM, photos)
    NONE = "none"


class Norm(StrEnum):
    INSTANCE = "instance"  # per sample and channel: the output depends on the window's own statistics
    BATCH = "batch"
    GROUP = "group"  # per sample and group of channels: as instance norm
    NONE = "none"


class Act(StrEnum):
    RELU = "relu"
    LEAKYRELU = "leakyrelu"
    GELU = "gelu"


class Upsample(StrEnum):
    TRANSPOSE = "transpose"
    INTERPOLATE = "interpolate"


class Downsample(StrEnum):
    MAXPOOL = "maxpool"
    CONV = "conv"


class Optimizer(StrEnum):
    ADAMW = "adamw"
    ADAM = "adam"
    SGD = "sgd"  # momentum 0.99, Nesterov


class Scheduler(StrEnum):
    COSINE = "cosine"
    POLY = "poly"
    CONSTANT = "constant"


class Precision(StrEnum):
    AUTO = "auto"  # float16 AMP on CUDA, float32 on CPUs
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


def _coerce_choices(config: object, section: str, choices: dict[str, type[StrEnum]]) -> None:
    """Hold each named field as its enum (a frozen dataclass built with a plain string); refuse an
    unknown value, naming the choices."""
    for name, kind in choices.items():
        value = getattr(config, name)
        try:
            object.__setattr__(config, name, kind(value))
        except ValueError:
            raise ValueError(f"{section}.{name}: {value!r} is not one of {[m.value for m in kind]}") from None


class ConfigError(ValueError):
    """A config that cannot be turned into types; the message names the file and the key."""


@dataclass(frozen=True)
class NetworkConfig:
    name: str = "unet"
    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 2
    features: tuple[int, ...] = (32, 64, 128, 256)
    norm: Norm = Norm.INSTANCE
    act: Act = Act.LEAKYRELU
    upsample: Upsample = Upsample.TRANSPOSE
    downsample: Downsample = Downsample.CONV
    dropout: float = 0.0
    deep_supervision: bool = False
    deep_supervision_levels: int = 2
    # Per level, per axis: the first level's stride is all 1; None means 2 (strides) and 3 (kernels) on
    # every axis, today's isotropic network. Anisotropic data pools a thick axis later or never, and
    # convolves along it with kernel 1 while it is much coarser than the others.
    strides: tuple[tuple[int, ...], ...] | None = None
    kernel_sizes: tuple[tuple[int, ...], ...] | None = None
    ensemble: int = 1  # >1: that many trained copies (cross-validation folds), probabilities averaged

    def __post_init__(self) -> None:  # NetworkConfig(norm="group") holds Norm.GROUP
        _coerce_choices(self, "network", {"norm": Norm, "act": Act, "upsample": Upsample, "downsample": Downsample})


@dataclass(frozen=True)
class PreprocessConfig:
    """Deterministic steps shared by training and inference; saved in every checkpoint."""

    spatial_dims: int = 3
    channels: tuple[str, ...] = ("image",)
    label_names: tuple[str, ...] = ("background", "foreground")
    orientation: str | None = "RAS"
    target_spacing: tuple[float, ...] | None = None
    normalization: Normalization = Normalization.ZSCORE
    nonzero: bool = False
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    ct_stats: tuple[float, float] = (0.0, 1.0)  # foreground mean and std of the dataset (ct_zscore)
    patch_size: tuple[int, ...] = (48, 64, 48)
    label_map: tuple[tuple[int, int], ...] = ()  # (value in file, class index) pairs, e.g. EM 255 -> 0

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class AugmentConfig:
    crop_samples: int = 1  # random crops drawn from each cached volume per visit
    pos_fraction: float = 0.67  # share of crops centred on foreground
    flip_prob: float = 0.0
    flip_axes: tuple[int, ...] = ()
    rotate_prob: float = 0.2
    rotate_range: float = 0.26  # radians, each axis
    rotate_in_plane: bool = False  # 3D: rotate about the last axis only (thick slices)
    scale_range: float = 0.15
    elastic_prob: float = 0.0
    intensity_prob: float = 0.3


@dataclass(frozen=True)
class DataConfig:
    manifest: Path = Path("manifest.csv")
    val_fraction: float = 0.2
    folds: int = 5
    fold: int | None = None  # None: a single split with `val_fraction`
    split_seed: int = 0
    fingerprint: Path | None = None  # the dataset's fingerprint.json (medunet plan), kept in every checkpoint
    # share of the cases kept in memory after the deterministic transforms (load, resample, normalize);
    # the others are read and transformed again each time they are drawn
    cache_rate: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.cache_rate <= 1.0:
            raise ConfigError(f"data.cache_rate: {self.cache_rate} is not between 0 and 1")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
    batch_size: int = 2
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    optimizer: Optimizer = Optimizer.ADAMW
    scheduler: Scheduler = Scheduler.COSINE
    warmup_epochs: int = 0
    val_every: int = 1
    time_limit_minutes: float | None = None
    # The learning-rate schedule follows the clock up to ``time_limit_minutes`` instead of the epochs
    # (``epochs`` is then a cap): the run ends annealed at the time limit whether the machine is faster
    # or slower than planned (not bitwise reproducible on resume).
    schedule_by_time: bool = False
    seed: int = 0
    num_threads: int | None = None
    num_workers: int = 0
    precision: Precision = Precision.AUTO
    compile: bool = False  # torch.compile for training (no steady gain measured on CPU; 33-45 s to compile)
    channels_last: bool = True  # channels-last activations (measured 20-32% faster per 3D training step on CPU)

    def __post_init__(self) -> None:
        _coerce_choices(self, "train", {"optimizer": Optimizer, "scheduler": Scheduler, "precision": Precision})


@dataclass(frozen=True)
class InferConfig:
    roi_size: tuple[int, ...] | None = None  # None: the training patch size
    overlap: float = 0.5
    sw_batch_size: int = 2
    mode: str = "gaussian"
    # Spatial axes the network was trained to be mirror-invariant along (training flips); ``--tta``
    # averages over mirrored copies along these. Filled from ``augment.flip_axes`` when a run is saved.
    tta_axes: tuple[int, ...] = ()
    # Average every window over those mirrored copies by default (``--tta``/``--no-tta`` override it);
    # None: decided on the validation cases after training, as a planned run does (kept where it raises
    # their mean Dice).
    tta: bool | None = False
    # Keep the largest connected component; None: decided on the validation cases after training, as a
    # planned run does (the foreground as a whole first, then each class, kept where it raises their Dice).
    largest_component: bool | None = False
    # With the filter on: keep the foreground's (every class together) largest component first ...
    largest_component_foreground: bool = False
    # ... then each of these classes' own (indices; empty: none); None: every class, as a filter set by hand
    largest_component_classes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config; ``overrides`` are dotted keys, e.g. ``{"train.epochs": 2}``."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    cfg = from_dict(ExperimentConfig, raw, where=str(path))
    manifest = cfg.data.manifest
    if not manifest.is_absolute():
        manifest = (path.parent / manifest).resolve()
    fingerprint = cfg.data.fingerprint
    if fingerprint is not None and not fingerprint.is_absolute():
        fingerprint = (path.parent / fingerprint).resolve()
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest=manifest, fingerprint=fingerprint))


def to_dict(cfg: Any) -> Any:
    """Plain, YAML/JSON-safe view of a config dataclass (for saving and for tracking)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, StrEnum):
        return str(cfg.value)
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def from_dict(cls: type, raw: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and converting nested types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; valid: {sorted(names)}")
    kwargs = {key: _convert(hints[key], value, f"{where}:{key}") for key, value in raw.items()}
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(typing.cast(type, tp), value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, where) for a, v in zip(args, value, strict=True))
    if isinstance(tp, type) and issubclass(tp, StrEnum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not one of {[m.value for m in tp]}") from None
    if tp is Path:
        return Path(value)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value
