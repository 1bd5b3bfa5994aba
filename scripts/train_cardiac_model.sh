#!/usr/bin/env bash
# Reproduce bundles/acdc_cardiac_mri_3d: plan and train on the ACDC dataset with nothing but the dataset
# and a 30-minute budget (patients grouped from the case names, patient-wise split, seed 0), then
# package the best checkpoint with its plan and fingerprint.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/acdc_cardiac_mri_3d}
DATA=${DATA:-../shared/data/acdc_cardiac}
.venv/bin/medunet train --dataset "$DATA" --output "$RUN" --time-budget 30m --device cpu
.venv/bin/medunet bundle build --run "$RUN" --name acdc_cardiac_mri_3d --card configs/cards/acdc_cardiac_mri_3d.yaml \
    --command "medunet train --dataset $DATA --output $RUN --time-budget 30m --device cpu"
