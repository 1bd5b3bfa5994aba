#!/usr/bin/env bash
# Create .venv and install medunet with its test tools and optional backends (ONNX Runtime, OpenVINO). PyTorch goes in first, so that pip does not
# pull a multi-GB CUDA build on a CPU machine; set TORCH_SPEC to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$VENV/bin/python" -m pip install --quiet -e ".[test,onnx,openvino]"  # the optional backends too: the tests run them
"$VENV/bin/python" -c "import torch, monai; print(f'torch {torch.__version__}, monai {monai.__version__}')"
