"""Several callers at once: threads segmenting with one loaded model get the masks they would get alone,
with the allocator tuning the command line allows switched on or off.

The threads run in a child process: each thread's malloc arena keeps its pages, and the memory budget
of the tests that follow in this process is planned from what the process holds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

CODE = """
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from medunet import runtime
from medunet.inference import load_model, segment

model = load_model(sys.argv[1], device="cpu")
scans = sorted(Path(sys.argv[2]).iterdir())[:4]
alone = [segment(scan, model).labels for scan in scans]
runtime.enable_allocator_tuning(sys.argv[3] == "tuned")
with ThreadPoolExecutor(max_workers=4) as pool:
    together = list(pool.map(lambda scan: segment(scan, model).labels, scans * 3))
differ = [k for k, labels in enumerate(together) if not torch.equal(labels, alone[k % len(scans)])]
print("differ", differ, "of", len(together))
"""


@pytest.mark.parametrize("tuned", ["plain", "tuned"])
@pytest.mark.slow
def test_threads_sharing_a_model_get_their_own_masks(data_dir: Path, tuned: str) -> None:
    images = data_dir / "msd_hippocampus" / "images"
    model = REPO / "bundles" / "hippocampus_mri_3d"
    proc = subprocess.run(
        [sys.executable, "-c", CODE, str(model), str(images), tuned], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "differ [] of 12"
