#!/usr/bin/env bash
# Reproduce the shipped default bundle: train the recipe on the msd_hippocampus manifest (patient-wise
# split, seed 0) and package the best checkpoint as bundles/hippocampus_mri_3d.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/hippocampus_mri_3d}
CONFIG=${CONFIG:-configs/hippocampus_3d.yaml}
.venv/bin/medunet train --config "$CONFIG" --output "$RUN" --device cpu
.venv/bin/medunet bundle build --run "$RUN" --name hippocampus_mri_3d --card configs/cards/hippocampus_mri_3d.yaml \
    --command "medunet train --config $CONFIG --output $RUN --device cpu"
# the ONNX graph beside the weights: `medunet infer` runs it with OpenVINO where that is installed
.venv/bin/medunet export bundles/hippocampus_mri_3d -o bundles/hippocampus_mri_3d --check-on examples/hippocampus_017.nii.gz
