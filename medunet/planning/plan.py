"""The self-configured plan: a dataset's fingerprint and a time budget in, a medunet config out.

``plan_dataset`` reads the dataset (any layout of ``medunet.data.layouts``), checks and fingerprints
it, applies the rules of ``medunet.planning.rules`` and writes three files side by side: the config
(YAML, every choice with its reason as a comment), the manifest it trains from, and the fingerprint.
The config is an ordinary medunet config: edit it and train it with ``medunet train --config``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medunet.config import (
    AugmentConfig,
    DataConfig,
    ExperimentConfig,
    InferConfig,
    NetworkConfig,
    Norm,
    Normalization,
    Optimizer,
    Precision,
    PreprocessConfig,
    Scheduler,
    TrainConfig,
    to_dict,
)
from medunet.data.layouts import Dataset, read_dataset
from medunet.data.splits import split_by_patient
from medunet.io.writers import write_text
from medunet.networks.registry import describe_network
from medunet.planning import rules
from medunet.planning.fingerprint import fingerprint_dataset, median_shape, median_spacing
from medunet.runtime import available_cpus, cores

log = logging.getLogger(__name__)

DEFAULT_BUDGET_MINUTES = 30.0
# Samples (2D slices or 3D patches) a run must see for the patch to stay at the median image size;
# a budget that affords fewer shrinks the patch (measured here: the hand-written hippocampus config
# reaches its Dice after about 2,200 3D patches; a 30-minute 2D cardiac U-Net was still improving after
# 33,000 slices of 144x128, and did no better with 26,000 of 176x192).
MIN_SAMPLES = {2: 40_000, 3: 2_000}
# On CPUs a step costs the same per sample at any batch size, so batches stay small: twice the updates
# for the same samples (a 2D cardiac U-Net at 0.87 validation Dice after 30 minutes at batch 16 had not
# converged). Batch norm from 8 slices on.
BATCH = {("cpu", 2): 8, ("cpu", 3): 2, ("cuda", 2): 12, ("cuda", 3): 2}
# decoder levels above the output that the loss also scores (nnU-Net's deep supervision)
DEEP_SUPERVISION_LEVELS = 2
BASE_FEATURES = {"cpu": 16, "cuda": 32}
MAX_FEATURES = {2: 256, 3: 256}
# bf16 autocast is chosen on a CPU where a training step runs at least this much faster in it
BF16_GAIN = 1.2
VALIDATION_SHARE = 0.15  # validate often enough to pick the best epoch, but in at most this share of the time
# below this share of its threads' CPU time while steps were timed, the planning process shared the CPU (2 cores,
# 2 threads: 0.49 while a training run used both cores, near 1 on an idle machine)
BUSY_CPU_SHARE = 0.75


@dataclass(frozen=True)
class PlanRequest:
    dataset: Path
    output: Path  # the plan's YAML; the manifest and fingerprint go beside it
    patient_regex: str | None = None
    time_budget_minutes: float = DEFAULT_BUDGET_MINUTES
    device: str = "cpu"
    workers: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class Plan:
    config: ExperimentConfig
    reasons: dict[str, str]  # dotted config key -> why
    notes: list[str] = field(default_factory=list)  # dataset-level remarks (grouping, warnings)
    config_path: Path | None = None


def plan_dataset(req: PlanRequest) -> Plan:
    """Read, check and fingerprint ``req.dataset``, plan it and write the plan (see the module docstring).

    Nothing is written when the dataset has problems (``DatasetError`` lists them all).
    """
    dataset = read_dataset(req.dataset, req.patient_regex)
    fp = fingerprint_dataset(dataset, workers=req.workers, progress=req.progress)
    plan = make_plan(dataset, fp, req.time_budget_minutes, req.device, name=req.output.stem)
    out = req.output
    manifest = out.with_name(f"{out.stem}.manifest.csv")
    fp_path = out.with_name(f"{out.stem}.fingerprint.json")
    config = replace(
        plan.config, data=replace(plan.config.data, manifest=Path(manifest.name), fingerprint=Path(fp_path.name))
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(fp_path, json.dumps(fp, indent=1))
    write_text(manifest, manifest_text(dataset, fp, config.preprocess.spatial_dims))
    write_text(out, render(replace(plan, config=config)))
    return replace(plan, config=config, config_path=out)


def make_plan(dataset: Dataset, fp: dict[str, Any], budget_minutes: float, device: str, name: str = "plan") -> Plan:
    """The plan for a fingerprinted dataset (no files written); CPU step times are measured here."""
    reasons: dict[str, str] = {}
    notes = [f"{dataset.layout} at {dataset.root}: {len(dataset.cases)} cases, {dataset.grouping}"]
    kind = "cuda" if device.startswith("cuda") else "cpu"
    image_dims = len(fp["cases"][0]["shape"])
    spacing = median_spacing(fp)
    shape = median_shape(fp)

    target, why = rules.target_spacing([c["spacing"] for c in fp["cases"]])
    reasons["preprocess.target_spacing"] = why
    use_2d, why = rules.choose_2d(image_dims, spacing, shape)
    reasons["network.spatial_dims"] = why
    dims = 2 if use_2d else 3
    # shape and spacing the network sees: resampled where the target says so, per slice for 2D
    seen_spacing = [t if (target and t > 0) else s for t, s in zip(target or spacing, spacing, strict=True)]
    seen_shape = [sh * sp / tsp for sh, sp, tsp in zip(shape, spacing, seen_spacing, strict=True)]
    if use_2d and image_dims == 3:
        seen_spacing, seen_shape = seen_spacing[:2], seen_shape[:2]

    labels = dict(fp["labels"])
    label_names = tuple(labels)
    values = list(labels.values())
    label_map = () if values == list(range(len(values))) else tuple((v, i) for i, v in enumerate(values))
    modalities = tuple(fp["modalities"])
    nonzero_fraction = float(np.median([ch["median_nonzero_fraction"] for ch in fp["channels"]]))
    norm, nonzero, why = rules.normalization_for(modalities, nonzero_fraction)
    reasons["preprocess.normalization"] = why
    ct_window, ct_stats = (-1000.0, 1000.0), (0.0, 1.0)
    if norm == "ct":
        ch = fp["channels"][0]
        ct_window = (ch["foreground_percentiles"]["0.5"], ch["foreground_percentiles"]["99.5"])
        ct_stats = (ch["foreground_mean"], ch["foreground_std"])

    batch = BATCH[(kind, dims)]
    base = BASE_FEATURES[kind]
    budget_s = budget_minutes * 60
    # the split training will draw (same rule, same seed), and what an epoch and a validation hold
    train_part, val_part = split_by_patient(list(dataset.cases), DataConfig.val_fraction, DataConfig.split_seed)
    case_shapes = {c["case"]: c["shape"] for c in fp["cases"]}
    slices = use_2d and image_dims == 3
    per_epoch = sum(case_shapes[c.case_id][-1] if slices else 1 for c in train_part)
    val_voxels = sum(math.prod(case_shapes[c.case_id]) for c in val_part)

    def network_for(patch: tuple[int, ...]) -> NetworkConfig:
        strides, kernels = rules.strides_and_kernels(seen_spacing, patch)
        isotropic = all(s == (1,) * dims or s == (2,) * dims for s in strides) and all(
            k == (3,) * dims for k in kernels
        )
        return NetworkConfig(
            name="unet",
            spatial_dims=dims,
            in_channels=len(modalities),
            out_channels=len(label_names),
            features=rules.features_for(len(strides), base, MAX_FEATURES[dims]),
            norm=Norm.BATCH if batch >= 8 else Norm.INSTANCE,
            deep_supervision=len(strides) > 2,  # a decoder level above the output to score
            deep_supervision_levels=DEEP_SUPERVISION_LEVELS,
            strides=None if isotropic else tuple(strides),
            kernel_sizes=None if isotropic else tuple(kernels),
        )

    # FLOP/s of a training step on this machine (measured with the plan's norm and loss), at the precision
    # that trains fastest here
    usage = CpuUsage()
    speed = _precision_for(kind, dims, Norm.BATCH if batch >= 8 else Norm.INSTANCE, usage=usage)
    precision, rate, reasons["train.precision"] = speed.precision, speed.train, speed.reason
    bf16 = precision == Precision.BF16

    # mirroring, along the axes the network sees; rotation and deformation that fit the geometry
    axes = list(range(dims))
    flip_axes, why = rules.mirror_axes([c.get("centroids", {}) for c in fp["cases"]], labels, axes)
    reasons["augment.flip_axes"] = why
    thick = rules.thick_axes(seen_spacing) if dims == 3 else []
    spatial, why = rules.spatial_augmentation(image_dims, dims, thick, flip_axes, len(train_part))
    augment = AugmentConfig(
        crop_samples=1,
        pos_fraction=0.67,
        flip_prob=0.5 if flip_axes else 0.0,
        flip_axes=flip_axes,
        rotate_prob=0.3,
        rotate_range=spatial.rotate_range,
        rotate_in_plane=spatial.rotate_in_plane,
        scale_range=0.15,
        elastic_prob=spatial.elastic_prob,
        intensity_prob=0.3,
    )
    reasons["augment.rotate_range"] = why
    workers, why_workers = rules.loader_workers(kind, cores())
    # on CPU the crop and augmentation of a batch add to a step: training computes on every core, so a
    # loader process takes its time from the step's cores (2 cores, cardiac plan: 0.217 s per step with a
    # loader process, 0.202 s without, 0.041 s of it augmentation); on CUDA the loaders hide it
    augment_counted = kind == "cpu"
    augment_s = _augment_seconds(augment, dims, seen_shape, len(values)) if augment_counted else (lambda patch: 0.0)

    def step_seconds(patch: tuple[int, ...]) -> float:
        flops = 3.0 * describe_network(network_for(patch)).flops(patch) * batch  # forward + backward
        return flops / rate + batch * augment_s(patch)

    def fits(patch: tuple[int, ...]) -> bool:
        samples = 0.8 * budget_s / step_seconds(patch) * batch
        return samples >= MIN_SAMPLES[dims]

    # patch sides move in steps of the network's stride, at most 16 (2D) or 8 (3D) voxels, so that a
    # deep network on a large image does not shrink its patch in leaps
    largest = rules.patch_multiple(rules.strides_and_kernels(seen_spacing, [round(s) for s in seen_shape])[0])
    multiple = tuple(min(m, 16 if dims == 2 else 8) for m in largest)
    patch, shrunk = rules.shrink_patch(seen_shape, seen_spacing, fits if kind == "cpu" else _fits_gpu, multiple)
    net = network_for(patch)
    est = step_seconds(patch)
    samples = 0.8 * budget_s / est * batch
    included = ", augmentation included" if augment_counted else ""
    reasons["preprocess.patch_size"] = f"the median image is {_x(seen_shape)} voxels" + (
        f"; shortened {shrunk} time(s) by the network's stride ({_x(multiple)}), longest side in mm first, until a "
        f"{budget_minutes:g}-minute budget affords {MIN_SAMPLES[dims]:,} samples on this machine "
        f"(about {samples:,.0f} at an estimated {est:.2f} s per step of {batch}{included})"
        if shrunk
        else f", which a {budget_minutes:g}-minute budget affords (about {samples:,.0f} samples at an estimated "
        f"{est:.2f} s per step of {batch}{included})"
    )
    reasons["train.batch_size"] = f"{batch} {'slices' if dims == 2 else 'patches'} per step on {kind.upper()}" + (
        "; batch norm, as a batch this large gives it stable statistics and makes a voxel's output "
        "independent of its inference window"
        if batch >= 8
        else "; instance norm, as batches are small"
    )
    strides, kernels = rules.strides_and_kernels(seen_spacing, patch)
    reasons["network.strides"] = (
        f"{len(strides)} levels: an axis is pooled while its spacing is within {rules.POOL_SPACING_RATIO:g}x the "
        f"finest and it keeps at least {rules.MIN_POOLED_SIZE} voxels; strides {[list(s) for s in strides]}"
    )
    reasons["network.kernel_sizes"] = (
        f"kernel 1 along an axis not yet pooled while it is over {rules.POOL_SPACING_RATIO:g}x coarser; "
        f"kernels {[list(k) for k in kernels]}"
    )
    reasons["network.deep_supervision"] = (
        f"the loss also scores the {min(DEEP_SUPERVISION_LEVELS, len(strides) - 2)} decoder level(s) above the "
        "output (upsampled, weights halving per level): the deep layers get a gradient of their own, which "
        "speeds up training within a time budget"
        if net.deep_supervision
        else f"off: a network of {len(strides)} levels has no decoder level above the output to score"
    )
    reasons["network.features"] = f"{base} channels at the top, doubling per level up to {MAX_FEATURES[dims]}"

    # epochs from the measured step time (and the batch's augmentation where it adds to a step)
    measured = _measure_step(net, patch, batch, bf16, usage=usage) + batch * augment_s(patch) if kind == "cpu" else est
    if usage.share < BUSY_CPU_SHARE:
        notes.append(
            f"the CPU was busy while training steps were timed: this process got {usage.share:.0%} of the CPU "
            f"time its {usage.threads} threads could use, so the patch and epochs fit a shared machine; "
            "plan again on an idle machine for a plan that uses all of it"
        )
    steps = max(1, per_epoch // batch)
    epoch_s = steps * measured
    # validation runs in float32; windows overlap by a half
    val_s = 1.5 * describe_network(net).flops(patch) / math.prod(patch) * val_voxels / speed.fp32
    val_every = max(1, math.ceil(val_s / (VALIDATION_SHARE * epoch_s)))
    overhead = 20.0 + 0.05 * len(dataset.cases)  # start-up and caching (a volume's slices load it once)
    epochs, why = rules.epochs_for(budget_s, epoch_s + val_s / val_every, overhead)
    reasons["train.epochs"] = (
        f"{why}; the run ends at the time limit and the rate decays by the clock, so this is a cap at twice "
        f"that estimate (a faster machine trains on)"
    )
    epochs *= 2
    reasons["train.val_every"] = (
        f"validation takes about {val_s:.0f} s; every {val_every} epoch(s) keeps it near {VALIDATION_SHARE:.0%}"
    )
    train = TrainConfig(
        epochs=epochs,
        batch_size=batch,
        learning_rate=0.003 if dims == 2 else 0.002,
        weight_decay=1e-5,
        optimizer=Optimizer.ADAMW,
        scheduler=Scheduler.COSINE,
        warmup_epochs=1 if epochs >= 20 else 0,
        val_every=val_every,
        time_limit_minutes=budget_minutes,
        precision=precision,
        schedule_by_time=True,
        seed=0,
        num_workers=workers,
    )
    reasons["train.num_workers"] = why_workers
    reasons["train.time_limit_minutes"] = "stops before an epoch that would end past the budget"
    reasons["train.schedule_by_time"] = (
        "the learning rate decays by the clock over the budget, so the run ends annealed at the time limit "
        "whether the machine is slower or faster than measured"
    )
    pre = PreprocessConfig(
        spatial_dims=dims,
        channels=modalities,
        label_names=label_names,
        orientation="RAS",
        target_spacing=target,  # a 2D network on 3D volumes: the volume is resampled (in plane), then sliced
        normalization=Normalization.CT_ZSCORE if norm == "ct" else Normalization.ZSCORE,
        nonzero=nonzero,
        ct_window=ct_window,
        ct_stats=ct_stats,
        patch_size=patch,
        label_map=label_map,
    )
    mirrored = bool(augment.flip_axes) and augment.flip_prob > 0
    infer = InferConfig(
        overlap=0.5, sw_batch_size=4 if dims == 2 else 2, tta=None if mirrored else False, largest_component=None
    )
    reasons["infer.tta"] = (
        "decided after training on the validation volumes: averaging every window over its copies mirrored along "
        "the axes training flipped (nnU-Net always does) is kept where it raises their mean Dice by 0.001; it "
        "doubles the network's work per mirrored axis, and the decision segments each validation volume both ways "
        "after the time budget"
        if mirrored
        else "off: training flipped no axis, so a mirrored copy is an image the network never learned"
    )
    reasons["infer.largest_component"] = (
        "decided after training on the validation volumes, as nnU-Net does: the foreground's largest connected "
        "component (every class together) kept where it raises their mean Dice, then each class's own where it "
        "raises that class's Dice"
    )
    cache, reasons["data.cache_rate"] = rules.cache_rate(
        _preprocessed_bytes(fp["cases"], target, len(modalities)), _memory_available()
    )
    config = ExperimentConfig(
        name=name,
        data=DataConfig(val_fraction=0.2, split_seed=0, cache_rate=cache),
        preprocess=pre,
        augment=augment,
        network=net,
        train=train,
        infer=infer,
    )
    if dataset.grouping:
        notes.append(f"patients: {dataset.grouping}")
    return Plan(config, reasons, notes)


def _preprocessed_bytes(cases: list[dict[str, Any]], target: tuple[float, ...] | None, channels: int) -> float:
    """Bytes of every case in memory after resampling to ``target`` (0: an axis kept): float32 image
    channels and a float32 label, as the transforms hold them."""
    total = 0.0
    for case in cases:
        grid = target or case["spacing"]
        shape = [n * s / t if t > 0 else n for n, s, t in zip(case["shape"], case["spacing"], grid, strict=True)]
        total += math.prod(shape) * 4 * (channels + 1)
    return total


def _memory_available() -> float:
    """Bytes of memory this process can still take: the kernel's MemAvailable, or less where a cgroup
    (a container) limits the process."""
    available = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = float(line.split()[1]) * 1024
    except OSError:
        pass
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            cap, used = Path(limit).read_text().strip(), Path(usage).read_text().strip()
        except OSError:
            continue
        if cap.isdigit() and used.isdigit():
            available = min(available, float(int(cap) - int(used)))
    return available


def _augment_seconds(
    aug: AugmentConfig, dims: int, image_shape: Sequence[float], classes: int, draws: int = 24
) -> Callable[[tuple[int, ...]], float]:
    """Seconds to crop and augment one training sample with ``aug``, as a function of the patch: timed
    on this machine at two patch sizes on a synthetic image of the median ``image_shape`` (a box of each
    foreground class in its middle, so that foreground-weighted crops find some), then linear in the
    patch's voxels (the crop's cost is per image, the augmentation's per patch voxel)."""
    import torch

    from medunet.transforms.pipelines import augment_transform

    shape = [max(8, round(s)) for s in image_shape]
    image = torch.randn(1, *shape)
    label = torch.zeros(1, *shape)
    for c in range(1, classes):  # nested boxes, the last class innermost (at least a voxel)
        lows = [min(s - 1, round(s * c / (2 * classes))) for s in shape]
        box: tuple[slice, ...] = tuple(
            slice(lo, max(lo + 1, round(s * (1 - c / (2 * classes))))) for lo, s in zip(lows, shape, strict=True)
        )
        label[0][box] = c
    small = tuple(min(s, 32 if dims == 2 else 16) for s in shape)
    large = tuple(min(s, 128 if dims == 2 else 48) for s in shape)

    repeats = max(1, draws if dims == 2 else draws // 4)

    def per_sample(patch: tuple[int, ...]) -> float:
        pre = PreprocessConfig(spatial_dims=dims, patch_size=patch)
        transform = augment_transform(pre, aug)
        transform.set_random_state(seed=0)
        transform({"image": image, "label": label})  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            transform({"image": image, "label": label})
        return (time.perf_counter() - started) / repeats

    t_small, t_large = per_sample(small), per_sample(large)
    v_small, v_large = math.prod(small), math.prod(large)
    slope = max(0.0, (t_large - t_small) / (v_large - v_small)) if v_large > v_small else 0.0
    return lambda patch: max(0.0, t_small + slope * (math.prod(patch) - v_small))


def _fits_gpu(patch: tuple[int, ...]) -> bool:
    """On CUDA the patch is bounded by memory: a 3D patch of at most 160³ voxels, a 2D one of 512²."""
    return math.prod(patch) <= (160**3 if len(patch) == 3 else 512**2)


@dataclass
class CpuUsage:
    """The CPU time this process got while training steps were timed, against the wall time its compute
    threads could have used: a share well below 1 means other processes took the cores, and the step
    times planned from are those of a shared machine."""

    cpu: float = 0.0
    capacity: float = 0.0  # wall seconds x the CPUs the threads could use
    threads: int = 0

    def timed(self, step: Callable[[], float]) -> float:
        import torch

        self.threads = torch.get_num_threads()
        cpus = min(float(self.threads), available_cpus())  # a container's quota caps what its threads can get
        wall, cpu = time.perf_counter(), time.process_time()
        seconds = step()
        self.cpu += time.process_time() - cpu
        self.capacity += (time.perf_counter() - wall) * cpus
        return seconds

    @property
    def share(self) -> float:
        return self.cpu / self.capacity if self.capacity > 0 else 1.0


@dataclass(frozen=True)
class StepSpeed:
    precision: Precision  # what training runs in
    train: float  # FLOP/s of a training step at ``precision``
    fp32: float  # FLOP/s at float32, as validation runs
    reason: str


def _precision_for(kind: str, dims: int, norm: Norm = Norm.INSTANCE, usage: CpuUsage | None = None) -> StepSpeed:
    """The training precision and the speed of a training step: on CPUs, bf16 autocast where the CPU
    computes bf16 natively and a step measured at least ``BF16_GAIN`` times as fast in it."""
    import torch

    if kind != "cpu":
        return StepSpeed(Precision.AUTO, 50e12, 50e12, "float16 autocast with loss scaling on CUDA")
    native = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # private: may go away
    if not (torch.backends.mkldnn.is_available() and native()):
        fp32 = _throughputs(dims, (False,), norm, usage=usage)[False]
        return StepSpeed(Precision.FP32, fp32, fp32, "float32: this CPU has no native bf16")
    rates = _throughputs(dims, (False, True), norm, usage=usage)
    fp32, bf16 = rates[False], rates[True]
    gain = bf16 / fp32
    if gain >= BF16_GAIN:
        why = f"bf16 autocast: a training step measured {gain:.1f}x as fast as in float32 here"
        return StepSpeed(Precision.BF16, bf16, fp32, why)
    why = f"float32: bf16 autocast measured {gain:.2f}x as fast here, too little to pay"
    return StepSpeed(Precision.FP32, fp32, fp32, why)


def _throughputs(
    dims: int, bf16: tuple[bool, ...], norm: Norm = Norm.INSTANCE, usage: CpuUsage | None = None
) -> dict[bool, float]:
    """FLOP/s of a U-Net training step on this CPU, per precision (bf16 autocast or not): timed on a
    small network with the plan's ``norm`` and deep supervision, so that step times of other patches
    follow from their FLOP counts (on 2 cores the same network ran 1.6x as fast per FLOP with batch norm
    as with instance norm)."""
    net = NetworkConfig(
        spatial_dims=dims,
        in_channels=1,
        out_channels=2,
        features=(16, 32, 64, 128),
        norm=norm,
        deep_supervision=True,
        deep_supervision_levels=DEEP_SUPERVISION_LEVELS,
    )
    patch = (128, 128) if dims == 2 else (48, 48, 48)
    batch = 8 if dims == 2 else 2
    seconds = _typical_steps([_step_timer(net, patch, batch, b) for b in bf16], usage=usage)
    flops = 3.0 * describe_network(net).flops(patch) * batch
    return {b: flops / s for b, s in zip(bf16, seconds, strict=True)}


def _measure_step(
    net_cfg: NetworkConfig,
    patch: tuple[int, ...],
    batch: int,
    bf16: bool = False,
    steps: int = 5,
    warmup: int = 2,
    usage: CpuUsage | None = None,
) -> float:
    """Seconds per training step of ``net_cfg`` (see ``_step_timer`` and ``_typical_steps``)."""
    return _typical_steps([_step_timer(net_cfg, patch, batch, bf16)], steps, warmup, usage)[0]


def _typical_steps(
    timers: list[Callable[[], float]], steps: int = 5, warmup: int = 2, usage: CpuUsage | None = None
) -> list[float]:
    """The median of ``steps`` timed steps of each timer, after ``warmup`` untimed ones (the first
    steps build oneDNN's kernels). The timers take turns, so a load that comes and goes slows them
    alike and cannot tip the choice between them (timed one after the other while an inference ran
    alongside, bf16 once measured 0.79x as fast as float32 instead of 1.8x). The median, not the
    fastest step, which a long run seldom sees. ``usage`` adds up the CPU time of the timed steps."""
    times: list[list[float]] = [[] for _ in timers]
    for i in range(steps + warmup):
        for k, timer in enumerate(timers):
            seconds = usage.timed(timer) if usage is not None and i >= warmup else timer()
            if i >= warmup:
                times[k].append(seconds)
    return [float(np.median(t)) for t in times]


def _step_timer(net_cfg: NetworkConfig, patch: tuple[int, ...], batch: int, bf16: bool) -> Callable[[], float]:
    """A function that runs one training step (forward, training loss, backward, AdamW) of ``net_cfg``
    on random data, under bf16 autocast with ``bf16``, and returns its seconds."""
    import torch
    from monai.losses import DeepSupervisionLoss

    from medunet.networks import create_network
    from medunet.training.losses import GlobalBatchDiceCELoss

    net = create_network(net_cfg)
    fmt = torch.channels_last_3d if len(patch) == 3 else torch.channels_last
    net = net.to(memory_format=fmt)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    x = torch.randn(batch, net_cfg.in_channels, *patch).to(memory_format=fmt)
    y = torch.randint(0, net_cfg.out_channels, (batch, 1, *patch))
    dice_ce = GlobalBatchDiceCELoss()  # as training computes it (medunet.training.loop.make_loss)
    loss_fn = DeepSupervisionLoss(dice_ce, weight_mode="exp") if net_cfg.deep_supervision else dice_ce

    def step() -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
            loss = loss_fn(list(out.unbind(1)) if out.dim() == x.dim() + 1 else out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    return step


def manifest_text(dataset: Dataset, fp: dict[str, Any], spatial_dims: int) -> str:
    """The plan's manifest: one row per case, or per slice when a 2D network trains on 3D volumes."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    slices = spatial_dims == 2 and len(fp["cases"][0]["shape"]) == 3
    writer.writerow(["case_id", "image", "label", "patient_id", *(["slice"] if slices else [])])
    shapes = {c["case"]: c for c in fp["cases"]}
    for case in dataset.cases:
        images = ";".join(str(p) for p in case.images)
        if not slices:
            writer.writerow([case.case_id, images, str(case.label), case.patient_id])
            continue
        depth = int(shapes[case.case_id]["shape"][-1])  # slices along the last axis after orientation to RAS
        for z in range(depth):
            writer.writerow([f"{case.case_id}_z{z:03d}", images, str(case.label), case.patient_id, z])
    return buf.getvalue()


def render(plan: Plan) -> str:
    """The plan as YAML, each key preceded by the reason it was chosen."""
    lines = [
        f"# medunet plan: {plan.config.name}",
        "# Written by `medunet plan`; every value can be edited, then trained with `medunet train --config`.",
    ]
    lines += [f"# {n}" for n in plan.notes]
    raw = to_dict(plan.config)
    for section, values in raw.items():
        if not isinstance(values, dict):
            lines.append(f"{section}: {_flow(values)}")
            continue
        lines.append(f"{section}:")
        for key, value in values.items():
            why = plan.reasons.get(f"{section}.{key}")
            if why:
                lines += [f"  # {chunk}" for chunk in _wrap(why)]
            lines.append(f"  {key}: {_flow(value)}")
    return "\n".join(lines) + "\n"


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip() if text.endswith("\n...") else text


def _wrap(text: str, width: int = 110) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        lines.append(cur)
    return lines


def _x(values: list[float] | tuple[float, ...]) -> str:
    return "x".join(f"{v:.0f}" for v in values)
