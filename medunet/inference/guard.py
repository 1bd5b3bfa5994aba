"""Input guard: does a scan look like the data the model was trained on?

``TrainingRange.from_fingerprint`` condenses a training fingerprint (``medunet.planning.fingerprint``)
into ranges; ``check_scan`` compares one loaded scan with them, before any preprocessing, and
returns one ``Flag`` per finding (no flag: nothing unusual). Geometry is compared in RAS axis order,
whatever the scan's orientation, as the fingerprint stores it; a geometry rule gives one flag naming
the axis that differs most (and the others that differ too). The rules, by flag code:

- ``channels`` / ``dims``: another number of channels, or 2D against 3D; the other rules are skipped.
- ``spacing``: along some axis the spacing is at least 3x coarser than the coarsest training scan's,
  or at least 3x finer than the finest's. A U-Net sees structures in voxels, and 3x lies well
  outside what differences between similar protocols produce.
- ``size``: the physical extent along some axis is under half the smallest training scan's (too
  little context for the network), or over 3x the largest's: the scan shows far more anatomy than any
  training scan (a whole head for a model of hippocampus crops), so the model is asked about regions
  it never saw. Training scans can trip neither, since the ranges are their own minima and maxima.
- ``invalid``: NaN or infinite voxels.
- ``blank``: at least 99% of the voxels of a channel hold one value (its 0.5th and 99.5th
  percentiles are equal): nothing to segment. The intensity rules below are then skipped.
- CT channels (named "CT", decided as ``medunet.planning.rules`` decides it), in Hounsfield units:
  ``modality`` when the scan's lowest value is above -200 HU (no air, lung or fat) while every
  training scan went below it: likely MRI or CT not in HU; ``intensity`` when under 1% of the voxels
  lie within the training foreground's HU range (its 0.5th to 99.5th percentile).
- Other channels (MRI and the like, whose scale differs between scanners, so only scale-free
  properties are compared): ``modality`` when at least 1% of the voxels are at or below -500 (air
  in CT is -1000 HU) while no training scan went below -500; ``intensity`` when the scan has strongly
  negative values (its 0.5th percentile below minus a tenth of its 99.5th) while every training scan
  was non-negative, when its low end sits far above zero (0.5th percentile over 0.25 plus the
  largest training minimum-to-maximum ratio, times its 99.5th: an offset), or when its share of
  voxels that are exactly zero exceeds the largest training share by more than 0.5 (a masked or
  padded scan, which shifts a per-scan normalization).

Percentiles and shares come from a strided subsample of about a million voxels per channel, minima
and maxima from every voxel, so a check costs a small fraction of segmenting the scan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch

from medunet.errors import MedunetError
from medunet.planning.fingerprint import FINGERPRINT_FORMAT
from medunet.planning.rules import normalization_for

SPACING_FACTOR = 3.0  # coarser or finer than the training range by this factor
SMALL_EXTENT = 0.5  # extent under this share of the smallest training extent
LARGE_EXTENT = 3.0  # extent over this multiple of the largest training extent
CT_FLOOR_HU = -200.0  # a CT scan in HU goes below this (air -1000, lung, fat about -100)
CT_WINDOW_SHARE = 0.01  # least share of voxels within the training foreground's HU range
AIR_HU = -500.0  # at or below: air in CT
AIR_SHARE = 0.01  # share of voxels at air level that marks a CT scan
NEGATIVE_RATIO = 0.1  # "strongly negative": 0.5th percentile below -this x the 99.5th
OFFSET_MARGIN = 0.25  # 0.5th / 99.5th percentile above the training min / max ratios by this
ZERO_MARGIN = 0.5  # share of zero voxels above the training maximum by this
SAMPLE_VOXELS = 2**20  # voxels per channel the percentiles are taken on
RAS = ("R", "A", "S")


@dataclass(frozen=True)
class Flag:
    """One way a scan differs from the training data: ``code`` (a short id, e.g. for a CSV column)
    and ``message`` (the difference in words, with its numbers)."""

    code: str
    message: str


@dataclass(frozen=True)
class ChannelRange:
    """The spread of one channel's per-case statistics in training (each a ``(lowest, highest)``)."""

    name: str
    ct: bool
    case_min: tuple[float, float]  # each scan's minimum
    low_ratio: tuple[float, float]  # each scan's minimum / maximum (scans with a positive maximum)
    zero_share: tuple[float, float]  # each scan's share of voxels that are exactly zero
    foreground: tuple[float, float, float]  # pooled foreground 0.5th, 50th, 99.5th percentiles


@dataclass(frozen=True)
class TrainingRange:
    """What the training scans spanned: per axis (RAS order for 3D) spacing and physical extent
    (shape x spacing, mm), and per channel the intensity ranges of ``ChannelRange``."""

    axes: tuple[str, ...]
    spacing: tuple[tuple[float, float], ...]  # per axis (smallest, largest)
    extent: tuple[tuple[float, float], ...]  # per axis (smallest, largest)
    channels: tuple[ChannelRange, ...]
    cases: int

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.channels)

    @classmethod
    def from_fingerprint(cls, fp: dict[str, Any]) -> TrainingRange:
        """The range of a ``medunet-fingerprint/1`` dict; a ``MedunetError`` says what is missing."""
        if fp.get("format") != FINGERPRINT_FORMAT:
            raise MedunetError(f"training fingerprint has format {fp.get('format')!r}, expected {FINGERPRINT_FORMAT!r}")
        cases = fp.get("cases")
        if not cases or not isinstance(cases, list):
            raise MedunetError("training fingerprint lists no cases")
        try:
            spacing = np.asarray([c["spacing"] for c in cases], dtype=np.float64)
            extent = np.asarray([c["shape"] for c in cases], dtype=np.float64) * spacing
            channels = tuple(
                _channel_range(str(name), [c["intensity"][i] for c in cases], fp["channels"][i])
                for i, name in enumerate(fp["modalities"])
            )
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise MedunetError(f"training fingerprint is incomplete or malformed ({exc!r})") from None
        if spacing.ndim != 2:
            raise MedunetError("training fingerprint: the cases' spacings differ in length")
        dims = spacing.shape[1]
        return cls(
            axes=RAS if dims == 3 else tuple(f"axis {i}" for i in range(dims)),
            spacing=_spread(spacing),
            extent=_spread(extent),
            channels=channels,
            cases=len(cases),
        )


def is_ct(name: str) -> bool:
    """Whether a channel of this name holds CT, decided as the planning rules decide it."""
    return normalization_for((name,), 1.0)[0] == "ct"


def _channel_range(name: str, per_case: list[dict[str, Any]], pooled: dict[str, Any]) -> ChannelRange:
    mins = [float(s["min"]) for s in per_case]
    ratios = [float(s["min"]) / float(s["max"]) for s in per_case if float(s["max"]) > 0]
    zeros = [1.0 - float(s["nonzero_fraction"]) for s in per_case]
    pct = pooled["foreground_percentiles"]
    return ChannelRange(
        name=name,
        ct=is_ct(name),
        case_min=(min(mins), max(mins)),
        low_ratio=(min(ratios), max(ratios)) if ratios else (0.0, 0.0),
        zero_share=(min(zeros), max(zeros)),
        foreground=(float(pct["0.5"]), float(pct["50.0"]), float(pct["99.5"])),
    )


def _spread(values: np.ndarray) -> tuple[tuple[float, float], ...]:
    return tuple((float(lo), float(hi)) for lo, hi in zip(values.min(axis=0), values.max(axis=0), strict=True))


def check_scan(image: torch.Tensor, training: TrainingRange) -> list[Flag]:
    """How a loaded scan ``(C, *S)`` (a ``MetaTensor`` with its ``affine``, before preprocessing)
    differs from ``training``; an empty list when it lies within the training range."""
    channels, dims = image.shape[0], image.ndim - 1
    if channels != len(training.channels):
        return [Flag("channels", f"{channels} channel(s), the model was trained on {len(training.channels)}")]
    if dims != len(training.axes):
        return [Flag("dims", f"the scan is {dims}D, the training scans were {len(training.axes)}D")]
    affine = np.asarray(getattr(image, "affine", np.eye(dims + 1)), dtype=np.float64)
    spacing, extent = physical_size(tuple(image.shape[1:]), affine)
    flags = geometry_flags(spacing, extent, training)
    data = image.detach().cpu()
    data = data.as_tensor() if hasattr(data, "as_tensor") else data
    for c, channel in enumerate(training.channels):
        found = intensity_flags(data[c].numpy(), channel)
        if len(training.channels) > 1:  # name the channel
            found = [Flag(f.code, f"channel {channel.name!r}: {f.message}") for f in found]
        flags += found
    return flags


def physical_size(shape: Sequence[int], affine: np.ndarray) -> tuple[list[float], list[float]]:
    """Spacing and extent (mm) per axis, in RAS order for 3D (as the fingerprint stores them)."""
    if len(shape) == 3:
        ornt = nib.orientations.io_orientation(affine)
        order = [int(np.nonzero(ornt[:, 0] == axis)[0][0]) for axis in range(3)]
    else:
        order = list(range(len(shape)))
    rows = 3 if len(shape) == 3 else min(2, affine.shape[0] - 1)
    spacing = [float(np.linalg.norm(affine[:rows, j])) if rows > 0 else 1.0 for j in order]
    return spacing, [shape[j] * s for j, s in zip(order, spacing, strict=True)]


def geometry_flags(spacing: Sequence[float], extent: Sequence[float], training: TrainingRange) -> list[Flag]:
    """At most one flag per rule, naming the axis that differs most (and the others that differ too)."""
    coarse, fine, small, large = [], [], [], []
    for axis, s, (lo, hi) in zip(training.axes, spacing, training.spacing, strict=True):
        if s >= SPACING_FACTOR * hi:
            coarse.append((s / hi, axis, s, hi))
        elif s * SPACING_FACTOR <= lo:
            fine.append((lo / s if s > 0 else math.inf, axis, s, lo))
    for axis, e, (lo, hi) in zip(training.axes, extent, training.extent, strict=True):
        if e < SMALL_EXTENT * lo:
            small.append((lo / e if e > 0 else math.inf, axis, e, lo))
        elif e > LARGE_EXTENT * hi:
            large.append((e / hi, axis, e, hi))
    rules = [
        (
            "spacing",
            coarse,
            "spacing {v:.3g} mm along {axis} is {f:.1f}x coarser than any training scan (at most {r:.3g} mm)",
        ),
        (
            "spacing",
            fine,
            "spacing {v:.3g} mm along {axis} is {f:.1f}x finer than any training scan (at least {r:.3g} mm)",
        ),
        (
            "size",
            small,
            "extent {v:.3g} mm along {axis} is {f:.1f}x smaller than the smallest training scan's ({r:.3g} mm)",
        ),
        ("size", large, "extent {v:.3g} mm along {axis} is {f:.1f}x the largest training scan's ({r:.3g} mm)"),
    ]
    return [Flag(code, _worst_axis(found, text)) for code, found, text in rules if found]


def _worst_axis(found: list[tuple[float, str, float, float]], text: str) -> str:
    """``text`` for the axis of the largest factor, then the other axes with theirs."""
    worst = max(found, key=lambda item: item[0])
    factor, axis, value, ref = worst
    others = ", ".join(f"{a} ({f:.1f}x)" for f, a, _, _ in found if a != axis)
    return text.format(v=value, axis=axis, f=factor, r=ref) + (f"; also along {others}" if others else "")


def intensity_flags(values: np.ndarray, channel: ChannelRange) -> list[Flag]:
    """Flags for one channel's voxels ``(*S)`` against its training range (see the module docstring)."""
    lowest, highest = float(values.min()), float(values.max())
    if not (math.isfinite(lowest) and math.isfinite(highest)):
        return [Flag("invalid", "holds NaN or infinite values")]
    sample = subsample(values)
    lo, hi = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
    if lo == hi:
        share = float(np.count_nonzero(sample == lo)) / sample.size
        what = "every voxel holds" if lowest == highest else f"{share:.1%} of voxels hold"
        return [Flag("blank", f"{what} the same value ({lo:.4g}): nothing to segment")]
    if channel.ct:
        return _ct_flags(sample, lowest, channel)
    return _other_flags(sample, lo, hi, channel)


def subsample(values: np.ndarray, voxels: int = SAMPLE_VOXELS) -> np.ndarray:
    """A strided view of about ``voxels`` voxels, copied flat (the full array is never copied)."""
    step = max(1, math.ceil((values.size / voxels) ** (1 / values.ndim)))
    return np.ascontiguousarray(values[(slice(None, None, step),) * values.ndim]).ravel()


def _ct_flags(sample: np.ndarray, lowest: float, channel: ChannelRange) -> list[Flag]:
    if lowest > CT_FLOOR_HU and channel.case_min[1] <= CT_FLOOR_HU:
        return [
            Flag(
                "modality",
                f"the lowest value is {lowest:.4g}, while every training CT scan went below "
                f"{CT_FLOOR_HU:g} HU (air, lung or fat): this does not look like CT in Hounsfield units",
            )
        ]
    a, _, b = channel.foreground
    share = float(np.count_nonzero((sample >= a) & (sample <= b))) / sample.size
    if share < CT_WINDOW_SHARE:
        return [
            Flag(
                "intensity",
                f"only {share:.2%} of voxels lie within the training foreground's range ({a:.4g} to {b:.4g} HU)",
            )
        ]
    return []


def _other_flags(sample: np.ndarray, lo: float, hi: float, channel: ChannelRange) -> list[Flag]:
    air = float(np.count_nonzero(sample <= AIR_HU)) / sample.size
    if air >= AIR_SHARE and channel.case_min[0] > AIR_HU:
        return [
            Flag(
                "modality",
                f"{air:.0%} of voxels are at or below {AIR_HU:g} (air in CT is -1000 HU) while "
                f"no training scan went below {channel.case_min[0]:.4g}: this looks like a CT scan",
            )
        ]
    flags = []
    if channel.case_min[0] >= 0 and lo < -NEGATIVE_RATIO * max(hi, 0.0):
        flags.append(
            Flag(
                "intensity",
                f"strongly negative values (0.5th percentile {lo:.4g}, 99.5th {hi:.4g}) "
                "while every training scan was non-negative",
            )
        )
    elif hi > 0 and lo / hi > channel.low_ratio[1] + OFFSET_MARGIN:
        flags.append(
            Flag(
                "intensity",
                f"no dark voxels: the 0.5th percentile is {lo / hi:.0%} of the 99.5th "
                f"({lo:.4g} of {hi:.4g}), while no training scan's minimum was over "
                f"{channel.low_ratio[1]:.0%} of its maximum",
            )
        )
    zeros = float(np.count_nonzero(sample == 0)) / sample.size
    if zeros > channel.zero_share[1] + ZERO_MARGIN:
        flags.append(
            Flag(
                "intensity",
                f"{zeros:.0%} of voxels are exactly zero, at most {channel.zero_share[1]:.1%} "
                "in training (masked or padded?)",
            )
        )
    return flags
