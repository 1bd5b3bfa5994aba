#!/usr/bin/env bash
# The main job on a fresh clone: install, then segment the shipped example scan with the shipped
# default model (bundles/hippocampus_mri_3d) and score the mask against the example's manual label.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=runs/quickstart
mkdir -p "$OUT/labels"
.venv/bin/medunet infer examples/hippocampus_017.nii.gz -o "$OUT/masks/hippocampus_017.nii.gz"
cp examples/hippocampus_017_label.nii.gz "$OUT/labels/hippocampus_017.nii.gz"
.venv/bin/medunet evaluate --pred "$OUT/masks" --label "$OUT/labels" -o "$OUT/report.csv"
