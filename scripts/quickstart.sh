#!/usr/bin/env bash
# The main job on a fresh machine: install, train the 3D hippocampus U-Net on the shipped manifest
# (about 17 minutes on 2 CPU cores), then segment a hippocampus scan and report its Dice.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${MEDUNET_DATA:-../shared/data}
RUN=${RUN:-runs/hippocampus_3d}
.venv/bin/medunet train --config configs/hippocampus_3d.yaml --output "$RUN"
CASE=$(python3 -c "import json,sys; print(json.load(open('$RUN/split.json'))['val'][0])")
mkdir -p runs/quickstart/labels
.venv/bin/medunet infer "$DATA/msd_hippocampus/images/$CASE.nii.gz" -o "runs/quickstart/masks/$CASE.nii.gz" --model "$RUN/best.pt"
cp "$DATA/msd_hippocampus/labels/$CASE.nii.gz" runs/quickstart/labels/
.venv/bin/medunet evaluate --pred runs/quickstart/masks --label runs/quickstart/labels -o runs/quickstart/report.csv
