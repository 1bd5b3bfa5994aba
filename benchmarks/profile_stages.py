"""Where one scan's time goes in ``medunet infer``: reading, preprocessing, network, blending,
mapping back, writing.

    python benchmarks/profile_stages.py SCAN [SCAN ...] [--model bundles/hippocampus_mri_3d] [--backend auto]
    python benchmarks/profile_stages.py a_flair.nii.gz,a_t1c.nii.gz --model RUN/best.pt

Each scan is segmented as ``medunet infer`` segments it (after one warm-up scan); the network's
windows are timed inside the blending loop, so "blending" is the sliding window's own work
(cutting windows, Gaussian weighting, accumulating, argmax). Seconds per stage, summed over the
scans, and each stage's share.
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the medunet command does

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from volumes import REPO

from medunet import runtime
from medunet.inference import expand_inputs, load_model
from medunet.inference.backends import Engine, WrappedEngine
from medunet.inference.batch import write_segmentation
from medunet.inference.predictor import InferOptions, finish, finish_scan, load_scan, predict
from medunet.io import load_image


class Timed(WrappedEngine):
    """An engine that counts the seconds spent in the network."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.seconds = 0.0

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.engine(window)
        self.seconds += time.perf_counter() - start
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scans", nargs="+")
    parser.add_argument("--model", default=str(REPO / "bundles" / "hippocampus_mri_3d"))
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    runtime.enable_allocator_tuning()
    model = load_model(args.model, backend=args.backend)
    runtime.settle_heap()
    timed = Timed(model.window_engine())
    model = replace(model, engine=timed)
    scans = expand_inputs(args.scans)
    stages = dict.fromkeys(("read", "preprocess", "network", "blending", "map back", "write"), 0.0)
    print(f"{len(scans)} scan(s); model {args.model} on {timed.describe()}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, scan in enumerate([scans[0], *scans]):  # the first scan twice: a warm-up
            t0 = time.perf_counter()
            image = load_image(list(scan), channels_in_file=len(model.preprocess.channels))
            t1 = time.perf_counter()
            loaded = load_scan(image, model)
            t2 = time.perf_counter()
            timed.seconds = 0.0
            predicted = predict(loaded.prep, model, InferOptions())
            t3 = time.perf_counter()
            seg = finish_scan(loaded, finish(predicted, model))
            t4 = time.perf_counter()
            write_segmentation(seg, model, Path(tmp) / f"{i}.nii.gz")
            t5 = time.perf_counter()
            if i == 0:
                continue
            for key, seconds in zip(
                stages, (t1 - t0, t2 - t1, timed.seconds, t3 - t2 - timed.seconds, t4 - t3, t5 - t4), strict=True
            ):
                stages[key] += seconds
    total = sum(stages.values())
    for key, seconds in stages.items():
        print(f"{key:10s} {seconds:7.2f} s  {seconds / total:6.1%}")
    print(f"{'total':10s} {total:7.2f} s")


if __name__ == "__main__":
    main()
