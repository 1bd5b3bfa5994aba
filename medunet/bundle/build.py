"""Making a MONAI bundle from a training run: configs wired to medunet components, weights, model card."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from medunet import __version__
from medunet.config import ExperimentConfig, from_dict, to_dict
from medunet.io import bundle_layout as layout
from medunet.io import run_layout as runs
from medunet.io import save_checkpoint
from medunet.io.model_file import ModelFile, read_run_model
from medunet.io.writers import write_text

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"


DEFAULT_LIMITATIONS = (
    "Trained on one public data set; performance on other scanners, sequences or populations is unknown."
)


@dataclass(frozen=True)
class ModelCard:
    """What the metadata and docs/README.md say about a model beyond what the run records."""

    task: str = "Segmentation"
    description: str = "A medunet segmentation model."
    modality: str = "n/a"
    intended_use: str = "Research use only; not for diagnosis or treatment."
    data_source: str = "n/a"
    data_license: str = "n/a"
    references: tuple[str, ...] = ()
    authors: str = "medunet contributors"
    copyright: str = "Copyright (c) medunet contributors"
    limitations: str = ""
    license_text: str = ""  # the LICENSE file; defaults to a note on code and weights


def load_card(path: Path | None) -> ModelCard:
    if path is None:
        return ModelCard()
    raw = yaml.safe_load(path.read_text()) or {}
    return from_dict(ModelCard, raw, where=str(path))


def build_bundle(
    run_dir: Path,
    dest: Path,
    card: ModelCard,
    version: str = "0.1.0",
    half_precision: bool = True,
    command: str = "",
) -> Path:
    """Write the bundle for ``run_dir/best.pt`` into ``dest`` (replaced atomically as a folder).

    For a cross-validation run (``fold_k/best.pt``, from ``medunet train --folds K``) the bundle's
    network is the ensemble of the folds and ``models/model.pt`` holds every fold's weights.
    """
    model = read_run_model(run_dir)
    folds = [] if (run_dir / runs.BEST).is_file() else runs.fold_checkpoints(run_dir)
    cv: dict[str, Any] | None = None
    if folds:
        config_file = folds[0].parent / runs.CONFIG
        summary = run_dir / runs.SUMMARY_JSON
        cv = json.loads(summary.read_text()) if summary.exists() else None
    else:
        config_file = run_dir / runs.CONFIG
    recipe_raw = yaml.safe_load(config_file.read_text())
    cfg: ExperimentConfig = from_dict(ExperimentConfig, recipe_raw, where=str(config_file))
    if folds:  # the recipe is the whole cross-validation, not its first fold
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, fold=None, folds=len(folds)))
        history = [cv_record(cv)] if cv else []
        split = {"folds": [json.loads((f.parent / runs.SPLIT).read_text())["val"] for f in folds]}
    else:
        history = json.loads((run_dir / runs.HISTORY).read_text()) if (run_dir / runs.HISTORY).exists() else []
        split = json.loads((run_dir / runs.SPLIT).read_text()) if (run_dir / runs.SPLIT).exists() else {}

    tmp = dest.parent / f".{dest.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "configs").mkdir(parents=True)
    (tmp / "models").mkdir()
    (tmp / "docs").mkdir()

    state = model.state_dict
    if half_precision:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_checkpoint(state, tmp / layout.WEIGHTS)

    manifest = os.path.relpath(cfg.data.manifest, dest.resolve()) if cfg.data.manifest.is_absolute() else None
    fingerprint = model.fingerprint
    if fingerprint is not None:  # a planned run: its data's fingerprint travels with the model
        (tmp / layout.FINGERPRINT).write_text(fingerprint)
    if (run_dir / runs.PLAN).is_file():
        shutil.copyfile(run_dir / runs.PLAN, tmp / layout.PLAN)
    data = dataclasses.replace(
        cfg.data,
        manifest=Path(manifest or "."),
        fingerprint=Path(layout.FINGERPRINT.name) if fingerprint is not None else None,
    )
    recipe = to_dict(dataclasses.replace(cfg, data=data))
    _dump(tmp / layout.METADATA, metadata(cfg, card, version, history))
    _dump(tmp / layout.INFERENCE, inference_config(model))
    _dump(tmp / layout.EVALUATE, evaluate_config())
    _dump(tmp / layout.TRAIN, train_config(recipe, folds=len(folds) or None))
    (tmp / layout.RECIPE).write_text(
        f"# Recipe that made models/model.pt. Reproduce with:\n#   {command or 'medunet train --config <this file>'}\n"
        + yaml.safe_dump(recipe, sort_keys=False)
    )
    (tmp / "configs" / "split.json").write_text(json.dumps(split, indent=1))
    card_text = model_card(
        dest.name, cfg, card, history, split, version, command, cv, fingerprint=fingerprint is not None
    )
    (tmp / layout.README).write_text(card_text)
    (tmp / layout.LICENSE).write_text(card.license_text or _default_license(card))

    old = dest.parent / f".{dest.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def cv_record(summary: dict[str, Any]) -> dict[str, Any]:
    """The cross-validation means in the shape of a history record (for metadata and the card)."""
    minutes = sum(f["minutes"] for f in summary["folds"])
    means = {f"dice_{c}": v for c, v in summary["mean"].items() if c != "mean"}
    return {"epoch": "cross-validation", **means, "dice_mean": summary["mean"]["mean"], "seconds": minutes * 60}


def metadata(cfg: ExperimentConfig, card: ModelCard, version: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    pre, net = cfg.preprocess, cfg.network
    best = max((h for h in history if "dice_mean" in h), key=lambda h: h["dice_mean"], default={})
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"trained with medunet {__version__}"},
        "monai_version": _version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"medunet": __version__, "nibabel": _version("nibabel"), "itk": _version("itk")},
        "name": cfg.name,
        "task": card.task,
        "description": card.description,
        "authors": card.authors,
        "copyright": card.copyright,
        "data_source": card.data_source,
        "data_type": "nibabel",
        "image_classes": f"{net.in_channels} channel(s) ({', '.join(pre.channels)}), {pre.normalization.value}",
        "label_classes": ", ".join(f"{i}: {n}" for i, n in enumerate(pre.label_names)),
        "pred_classes": ", ".join(f"{i}: {n}" for i, n in enumerate(pre.label_names)),
        "eval_metrics": {f"val_{k}": round(v, 4) for k, v in best.items() if k.startswith("dice_")},
        "intended_use": card.intended_use,
        "references": list(card.references),
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": card.modality,
                    "num_channels": net.in_channels,
                    "spatial_shape": list(pre.patch_size),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): c for i, c in enumerate(pre.channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": net.out_channels,
                    "spatial_shape": list(pre.patch_size),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): n for i, n in enumerate(pre.label_names)},
                }
            },
        },
    }


def inference_config(model: ModelFile) -> dict[str, Any]:
    """``configs/inference.json``: a folder of scans in, masks with the scans' geometry out."""
    return {
        "imports": ["$import medunet.bundle.components"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/data'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "cpu",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "network_def": {"_target_": layout.NETWORK_TARGET, **to_dict(model.network)},
        "segmenter": {
            "_target_": layout.SEGMENTER_TARGET,
            "network": "@network_def",
            "checkpoint": "@checkpoint",
            "dataset_dir": "@dataset_dir",
            "output_dir": "@output_dir",
            "device": "@device",
            "preprocess": to_dict(model.preprocess),
            "infer": to_dict(model.infer),
        },
        "run": ["$@segmenter.run()"],
    }


def evaluate_config() -> dict[str, Any]:
    """``configs/evaluate.json``, merged over inference.json: segment ``images/`` and score against ``labels/``."""
    return {
        "dataset_dir": "$@bundle_root + '/data/images'",
        "labels_dir": "$@bundle_root + '/data/labels'",
        "output_dir": "$@bundle_root + '/eval/masks'",
        "evaluator": {
            "_target_": "medunet.bundle.components.FolderEvaluator",
            "segmenter": "@segmenter",
            "labels_dir": "@labels_dir",
            "report": "$@bundle_root + '/eval/report.csv'",
        },
        "run": ["$@evaluator.run()"],
    }


def train_config(recipe: dict[str, Any], folds: int | None = None) -> dict[str, Any]:
    """``configs/train.json``: retrain the recipe that made the weights (every fold, for an ensemble)."""
    return {
        "imports": ["$import medunet.bundle.components"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/runs/retrain'",
        "device": "auto",
        "recipe": recipe,
        "folds": folds,
        "run": ["$medunet.bundle.components.run_training(@recipe, @bundle_root, @output_dir, @device, @folds)"],
    }


_FINGERPRINT_TEXT = """
## Training fingerprint
`configs/fingerprint.json` is the fingerprint of the training and validation cases (shape, spacing,
orientation and intensities per case; `medunet.planning.fingerprint`). `medunet infer` compares every
scan with it and warns about a scan unlike them (another modality, a blank volume, a far coarser
spacing, a much smaller or larger field of view); `--strict` refuses such a scan.
"""


def model_card(
    name: str,
    cfg: ExperimentConfig,
    card: ModelCard,
    history: list[dict[str, Any]],
    split: dict[str, list[str]],
    version: str,
    command: str,
    cv: dict[str, Any] | None = None,
    fingerprint: bool = False,
) -> str:
    pre, net, tc = cfg.preprocess, cfg.network, cfg.train
    best = max((h for h in history if "dice_mean" in h), key=lambda h: h["dice_mean"], default={})
    classes = pre.label_names[1:]
    rows = "\n".join(f"| {c} | {best.get(f'dice_{c}', float('nan')):.4f} |" for c in classes)
    minutes = history[-1]["seconds"] / 60 if history else float("nan")
    refs = "\n".join(f"- {r}" for r in card.references) or "- n/a"
    split_text = (
        f"Split by patient (`data.split_seed={cfg.data.split_seed}`): {len(split.get('train', []))} training and\n"
        f"{len(split.get('val', []))} validation cases; the case ids are in `configs/split.json`."
    )
    validation = f"""## Validation (best epoch {best.get("epoch", "?")}, patient-wise validation split)
| class | Dice |
| --- | --- |
{rows}
| mean | {best.get("dice_mean", float("nan")):.4f} |"""
    if "folds" in split:
        n_folds = len(split["folds"])
        split_text = (
            f"{n_folds}-fold cross-validation by patient (`data.split_seed={cfg.data.split_seed}`): every case is\n"
            f"validated once, by the fold model that never saw its patient ({sum(len(v) for v in split['folds'])} "
            "cases); each fold's validation case ids are in `configs/split.json`.\n"
            f"`models/model.pt` holds the {n_folds} fold models; inference averages their probabilities."
        )
    if cv is not None:
        head = "| fold | " + " | ".join(classes) + " | mean |\n| --- |" + " --- |" * (len(classes) + 1)
        lines = [
            f"| {f['fold']} | " + " | ".join(f"{f['dice'][c]:.4f}" for c in classes) + f" | {f['dice_mean']:.4f} |"
            for f in cv["folds"]
        ]
        m, sd = cv["mean"], cv["std"]
        lines.append(
            "| mean ± sd | " + " | ".join(f"{m[c]:.4f} ± {sd[c]:.4f}" for c in classes) + f" | {m['mean']:.4f} |"
        )
        validation = "## Validation (cross-validation: each fold's best epoch on its own validation patients)\n"
        validation += head + "\n" + "\n".join(lines)
    return f"""# {name} (version {version})

{card.description}

**{card.intended_use}**

## Data
{card.data_source}

Licence of the data: {card.data_license}.
{split_text}

## Recipe
{net.name} ({net.spatial_dims}D, features {list(net.features)}, {net.norm} norm), DiceCE loss, {tc.optimizer}
lr {tc.learning_rate} with a {tc.scheduler} schedule, batch {tc.batch_size}, patch {list(pre.patch_size)},
{tc.epochs} epochs, seed {tc.seed}; preprocessing: orientation {pre.orientation}, {pre.normalization.value}
normalization. Trained in {minutes:.1f} minutes on {platform.machine()} ({os.cpu_count()} logical cores) with
`{command or "medunet train"}`. The full recipe is `configs/recipe.yaml`; `configs/train.json` reruns it.

{validation}

## Use
```
medunet infer scan.nii.gz -o mask.nii.gz --model bundles/{name}
python -m monai.bundle run --config_file bundles/{name}/configs/inference.json \\
    --bundle_root bundles/{name} --dataset_dir <scans> --output_dir <masks>
```
Input: {net.in_channels} channel(s) ({", ".join(pre.channels)}). Output: a label map
({", ".join(f"{i} {n}" for i, n in enumerate(pre.label_names))}) on the input's grid.
{_FINGERPRINT_TEXT if fingerprint else ""}
## Limitations
{card.limitations or DEFAULT_LIMITATIONS}
Research use only.

## References
{refs}
"""


def _default_license(card: ModelCard) -> str:
    return (
        "Code: Apache-2.0 (medunet).\n"
        f"Model weights: derived from training data licensed {card.data_license}; "
        "the weights are shared under the same terms. Research use only.\n"
    )


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _dump(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")
