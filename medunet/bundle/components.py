"""The components a medunet bundle's MONAI configs instantiate (``_target_: medunet.bundle.components.*``).

They keep the bundle declarative: ``python -m monai.bundle run --config_file configs/inference.json``
builds these objects and calls ``run()``; the logic stays in the library.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from medunet.config import ExperimentConfig, InferConfig, NetworkConfig, PreprocessConfig, from_dict
from medunet.errors import InputError
from medunet.evaluation import evaluate_folders
from medunet.inference import SegmentationModel, expand_inputs, plan_jobs, run_jobs
from medunet.io import load_checkpoint
from medunet.networks import create_network
from medunet.training import TrainRequest, train

log = logging.getLogger(__name__)


def network(**kwargs: Any) -> nn.Module:
    """``network_def``: a registered network from plain keyword arguments (``NetworkConfig`` fields)."""
    return create_network(from_dict(NetworkConfig, kwargs, where="network_def"))


def load_weights(net: nn.Module, checkpoint: str | Path) -> nn.Module:
    """Load ``models/model.pt`` (a state dict, possibly half precision) with ``weights_only``."""
    state = load_checkpoint(checkpoint)
    state = state.get("state_dict", state)
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval()


class FolderSegmenter:
    """Segment every scan in ``dataset_dir`` (files, DICOM folders) into ``output_dir``."""

    def __init__(
        self,
        network: nn.Module,
        checkpoint: str,
        dataset_dir: str,
        output_dir: str,
        preprocess: dict[str, Any],
        infer: dict[str, Any],
        device: str = "cpu",
    ) -> None:
        cfg = getattr(network, "config", None)
        if not isinstance(cfg, NetworkConfig):
            raise InputError(checkpoint, "network_def must be medunet.bundle.components.network")
        self.dataset_dir = Path(dataset_dir)
        self.output_dir = Path(output_dir)
        self.model = SegmentationModel(
            network=load_weights(network, checkpoint).to(device),
            network_config=cfg,
            preprocess=from_dict(PreprocessConfig, preprocess, where="segmenter.preprocess"),
            infer=from_dict(InferConfig, infer, where="segmenter.infer"),
            source=str(checkpoint),
        )

    def run(self) -> list[Path]:
        if not self.dataset_dir.is_dir():
            raise InputError(self.dataset_dir, "dataset_dir is not a folder")
        jobs = plan_jobs(expand_inputs([str(self.dataset_dir)]), self.output_dir, self.model.preprocess.spatial_dims)
        result = run_jobs(jobs, self.model)
        for path in result.written:
            log.info("wrote %s", path)
        if result.failed:
            raise RuntimeError(f"{len(result.failed)} of {len(jobs)} scans failed: {result.failed}")
        return result.written


class FolderEvaluator:
    """Segment ``images_dir`` and score the masks against ``labels_dir`` (same file names)."""

    def __init__(self, segmenter: FolderSegmenter, labels_dir: str, report: str) -> None:
        self.segmenter = segmenter
        self.labels_dir = Path(labels_dir)
        self.report = Path(report)

    def run(self) -> dict[int, dict[str, float]]:
        self.segmenter.run()
        summary = evaluate_folders(self.segmenter.output_dir, self.labels_dir, self.report)
        for label, s in summary.items():
            log.info("label %d: Dice %.4f ± %.4f over %d cases", label, s["dice_mean"], s["dice_std"], s["n"])
        return summary


def run_training(
    recipe: dict[str, Any], bundle_root: str, output_dir: str, device: str = "auto", folds: int | None = None
) -> Path:
    """``train.json``: retrain the bundle's recipe (manifest relative to ``bundle_root``); with ``folds``,
    the whole cross-validation, whose folder then loads as the ensemble."""
    cfg = from_dict(ExperimentConfig, recipe, where="train.recipe")
    manifest = cfg.data.manifest if cfg.data.manifest.is_absolute() else Path(bundle_root) / cfg.data.manifest
    import dataclasses

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest=manifest.resolve()))
    from medunet.training.job import choose_postprocessing, decisions_left_open

    if folds:
        from medunet.training.crossval import cross_validate

        summary = cross_validate(cfg, Path(output_dir), folds, device=device, progress=False)
        log.info("cross-validation mean Dice %.4f", summary["mean"]["mean"])
        if decisions_left_open(cfg):  # a planned recipe: decided on every fold's own validation cases, as `train` does
            log.info("%s", choose_postprocessing([Path(f["checkpoint"]) for f in summary["folds"]], cfg))
        return Path(output_dir)
    result = train(TrainRequest(cfg, Path(output_dir), device=device, progress=False))
    log.info("best mean Dice %.4f at epoch %d", result.best_dice, result.best_epoch)
    if decisions_left_open(cfg):
        log.info("%s", choose_postprocessing([result.best_checkpoint], cfg))
    return result.best_checkpoint
