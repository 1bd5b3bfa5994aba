"""Several callers at once: threads segmenting with one loaded model get the masks they would get alone,
with the allocator tuning the command line allows switched on or off."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from medunet import runtime
from medunet.inference import load_model, segment
from tests.conftest import REPO


@pytest.mark.parametrize("tuned", [False, True])
def test_threads_sharing_a_model_get_their_own_masks(data_dir: Path, tuned: bool) -> None:
    model = load_model(REPO / "bundles" / "hippocampus_mri_3d", device="cpu")
    scans = sorted((data_dir / "msd_hippocampus" / "images").iterdir())[:4]
    alone = [segment(scan, model).labels for scan in scans]
    runtime.enable_allocator_tuning(tuned)
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            together = list(pool.map(lambda scan: segment(scan, model).labels, scans * 3))
    finally:
        runtime.enable_allocator_tuning(False)
    for k, labels in enumerate(together):
        assert torch.equal(labels, alone[k % len(scans)]), f"call {k} ({scans[k % len(scans)].name}) differs"
