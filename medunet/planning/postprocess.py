"""Mirrored test-time averaging and post-processing chosen on the validation cases after training.

The trained model segments each validation volume through the same path as ``medunet infer``, with and
without averaging over copies mirrored along the axes training flipped (nnU-Net always averages; here
it is kept where it raises the mean Dice over those volumes). On the segmentations as chosen, the
largest-connected-component filter, of the foreground as a whole and then of each class, is kept where
it raises the Dice, as nnU-Net decides it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medunet.config import ExperimentConfig
from medunet.data import read_manifest
from medunet.evaluation import dice_from_counts, overlap_counts
from medunet.io import load_checkpoint, load_image, save_checkpoint

MIN_GAIN = 0.001  # Dice a filter step must add to be kept (the mean over classes; a class's own Dice)


@dataclass(frozen=True)
class PostprocessChoice:
    foreground: bool  # the foreground's largest component kept, first
    classes: tuple[int, ...]  # then each of these classes' own
    class_names: tuple[str, ...]
    raw: tuple[float, ...]  # mean Dice per foreground class over the volumes, without a filter
    after_foreground: tuple[float, ...]  # ... with the foreground's largest component kept
    after_class: tuple[float, ...]  # ... each class's own, on top of the foreground step as chosen
    volumes: int
    # mirrored averaging: kept or not (None: not decided here), and the mean Dice without and with it
    tta: bool | None = None
    tta_dice: tuple[float, float] | None = None  # None: trained without mirroring, nothing to average
    filter_decided: bool = True  # False: the filter was set in the config and left as it is

    @property
    def largest_component(self) -> bool:
        return self.foreground or bool(self.classes)

    @property
    def dice_without(self) -> float:
        return float(np.mean(self.raw))

    @property
    def dice_with(self) -> float:
        chosen = self.after_foreground if self.foreground else self.raw
        return float(np.mean([self.after_class[c - 1] if c in self.classes else d for c, d in enumerate(chosen, 1)]))

    def describe(self) -> str:
        said = []
        if self.tta is not None:
            verdict = "kept" if self.tta else "not kept"
            how = "trained without mirroring"
            if self.tta_dice:
                how = f"{self.tta_dice[0]:.4f} -> {self.tta_dice[1]:.4f}, mean Dice on {self.volumes} volumes"
            said.append(f"mirrored test-time averaging {verdict} ({how})")
        if self.filter_decided:
            said.append(self._describe_filter())
        return "; ".join(said)

    def _describe_filter(self) -> str:
        base = self.after_foreground if self.foreground else self.raw
        fg = np.mean(self.after_foreground)
        steps = [f"the foreground as one {'kept' if self.foreground else 'not kept'} ({fg:.4f})"] + [
            f"{name} {'kept' if c in self.classes else 'not kept'} ({base[c - 1]:.4f} -> {self.after_class[c - 1]:.4f})"
            for c, name in enumerate(self.class_names, 1)
        ]
        return (
            f"largest-component post-processing {'kept' if self.largest_component else 'not kept'}: "
            f"{'; '.join(steps)}; mean Dice {self.dice_without:.4f} without, {self.dice_with:.4f} as chosen, on "
            f"{self.volumes} validation volumes"
        )


def choose_postprocessing(checkpoints: Sequence[Path], cfg: ExperimentConfig) -> PostprocessChoice:
    """Decide what ``cfg.infer`` leaves open (``tta``, ``largest_component``: None) on the validation
    volumes of ``checkpoints`` (one model, or the folds of a cross-validation, each segmenting its own
    validation volumes, whose Dice are pooled). Mirrored averaging first, kept where it raises the mean
    Dice by ``MIN_GAIN``; then, on the segmentations as chosen, the largest-component filter as nnU-Net
    decides it: the foreground's largest component (every class together) kept where it raises the mean
    Dice; then each class's own on top, kept where it raises that class's Dice (removing a class's
    voxels changes no other class's Dice, so the classes are decided one by one). The choice is written
    into every checkpoint (each replaced atomically)."""
    import torch

    from medunet.inference.model import model_from_payload
    from medunet.inference.predictor import InferOptions, keep_largest_components, segment

    # with and without mirrored averaging, per volume, Dice per foreground class: no filter, foreground,
    # each class, both
    rows: dict[bool, tuple[list[list[float]], ...]] = {False: ([], [], [], []), True: ([], [], [], [])}
    payloads = [load_checkpoint(checkpoint) for checkpoint in checkpoints]
    manifest = read_manifest(cfg.data.manifest)
    volumes: dict[str, tuple[tuple[Path, ...], Path]] = {}
    models = [model_from_payload(p, str(c)) for c, p in zip(checkpoints, payloads, strict=True)]
    can_mirror = all(model.infer.tta_axes for model in models)
    mirrored = cfg.infer.tta is None and can_mirror  # both ways, to choose
    fixed = bool(cfg.infer.tta) and can_mirror  # the one way inference goes otherwise
    for checkpoint, model in zip(checkpoints, models, strict=True):
        val_ids = set(json.loads((checkpoint.parent / "split.json").read_text())["val"])
        own: dict[str, tuple[tuple[Path, ...], Path]] = {}
        for case in manifest:
            if case.case_id in val_ids and case.label is not None:
                own.setdefault(case.volume_id, (case.images, case.label))  # a volume's slices share it
        volumes |= own
        n = model.preprocess.num_classes
        for images, label_path in own.values():
            label = load_image(label_path, spatial_dims=(2, 3))
            values = torch.round(label.as_tensor()[0]).to(torch.int64)
            truth = torch.zeros_like(values)
            for index, value in enumerate(model.label_values):
                truth[values == value] = index
            for averaged in (False, True) if mirrored else (fixed,):
                options = InferOptions(tta=averaged, largest_component=False)
                pred = segment(list(images), model, options=options).labels.to(torch.int64)
                kept_fg = keep_largest_components(pred, n, classes=(), foreground=True).to(torch.int64)
                filtered = (pred, kept_fg, keep_largest_components(pred, n), keep_largest_components(kept_fg, n))
                for table, labels in zip(rows[averaged], filtered, strict=True):
                    table.append(list(dice_from_counts(overlap_counts(labels.to(torch.int64), truth, n))))
    names = tuple(cfg.preprocess.label_names[1:])

    def means(table: list[list[float]]) -> tuple[float, ...]:
        return tuple(float(v) for v in np.nanmean(table, axis=0)) if table else (float("nan"),) * len(names)

    tta: bool | None = None
    tta_dice = None
    if cfg.infer.tta is None:
        plain_dice, mirrored_dice = means(rows[False][0]), means(rows[True][0])
        tta = mirrored and keeps_mirroring(plain_dice, mirrored_dice)
        tta_dice = (float(np.mean(plain_dice)), float(np.mean(mirrored_dice))) if mirrored else None
    chosen = rows[fixed if tta is None else tta]
    raw, fg, each, fg_each = (means(table) for table in chosen)
    choice = decide(names, raw, fg, each, fg_each, len(volumes))
    choice = replace(choice, tta=tta, tta_dice=tta_dice, filter_decided=cfg.infer.largest_component is None)
    decided: dict[str, object] = {}
    if tta is not None:
        decided["tta"] = tta
    if cfg.infer.largest_component is None:
        decided |= {
            "largest_component": choice.largest_component,
            "largest_component_foreground": choice.foreground,
            "largest_component_classes": list(choice.classes),
        }
    for checkpoint, payload in zip(checkpoints, payloads, strict=True):
        payload["infer"] = {**payload.get("infer", {}), **decided}
        save_checkpoint(payload, checkpoint)
    return choice


def keeps_mirroring(plain: tuple[float, ...], mirrored: tuple[float, ...]) -> bool:
    """Whether averaging over mirrored copies is kept, from the mean Dice per foreground class over the
    validation volumes without and with it: where it raises their mean by ``MIN_GAIN`` (it costs a
    network pass per copy, so a tie keeps the single pass)."""
    return bool(float(np.mean(mirrored)) >= float(np.mean(plain)) + MIN_GAIN)


def decide(
    names: tuple[str, ...],
    raw: tuple[float, ...],
    foreground: tuple[float, ...],
    each_class: tuple[float, ...],
    foreground_then_each: tuple[float, ...],
    volumes: int,
) -> PostprocessChoice:
    """The choice from mean Dice per foreground class over the validation volumes: without a filter,
    with the foreground's largest component, with each class's own, and with both. The foreground step
    is kept where it raises the mean by ``MIN_GAIN``; then a class's own step where it raises that
    class's Dice by as much over what the foreground step left (no volumes: nothing is kept)."""
    use_fg = volumes > 0 and float(np.mean(foreground)) >= float(np.mean(raw)) + MIN_GAIN
    base, after = (foreground, foreground_then_each) if use_fg else (raw, each_class)
    classes = tuple(c for c in range(1, len(names) + 1) if volumes > 0 and after[c - 1] >= base[c - 1] + MIN_GAIN)
    return PostprocessChoice(use_fg, classes, names, raw, foreground, after, volumes)
