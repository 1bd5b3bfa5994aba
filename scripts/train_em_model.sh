#!/usr/bin/env bash
# Reproduce bundles/em_membrane_2d: plan and train on the ISBI 2012 sections (through their manifest:
# blocks of 5 consecutive sections as patients, patient-wise split, seed 0) with a 40-minute budget,
# then package the best checkpoint with its plan and fingerprint.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/em_membrane_2d}
.venv/bin/medunet train --dataset data_manifests/isbi2012_membrane_2d.csv --output "$RUN" --time-budget 40m --device cpu
.venv/bin/medunet bundle build --run "$RUN" --name em_membrane_2d --card configs/cards/em_membrane_2d.yaml \
    --command "medunet train --dataset data_manifests/isbi2012_membrane_2d.csv --output $RUN --time-budget 40m --device cpu"
