#!/usr/bin/env bash
# Set up .venv (see setup.sh) and run the test suite. Real data is read from ../shared/data
# (override with MEDUNET_TEST_DATA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"   # as in an activated venv: tests run medunet and mlflow commands
.venv/bin/python -m pytest "$@"
