"""Scans per minute over a folder of real scans, three ways, with the same model and outputs.

    python benchmarks/batch_throughput.py [--scans ../shared/data/msd_hippocampus/images] [--limit 200]
    python benchmarks/batch_throughput.py --model RUN/best.pt --scans a_flair.nii.gz,a_t1c.nii.gz b_flair...,...

- pipelined: ``medunet infer`` today (``run_jobs``): the model loaded once; a reader thread reads and
  preprocesses the next scan and a writer thread maps the previous mask back and writes it while the
  network runs on the current one;
- sequential: the same, one stage after another (``run_jobs(..., pipelined=False)``);
- reload per file: the sequential loop loading the model again for every scan, as a tool that is
  started once per file does (weights and set-up each time; no process start-up counted).

Each way writes every mask (NIfTI, compressed) and the statistics CSV to its own temporary folder;
the masks of the three are compared. Printed: seconds, scans per minute, the speed-up of pipelined
over the others, and each way's peak resident memory (sampled every 5 ms).
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the medunet command does

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_speed import PeakMemory, gib
from volumes import REPO

from medunet import runtime
from medunet.inference import expand_inputs, load_model, plan_jobs, run_jobs
from medunet.inference.batch import Extras, Job, scan_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "bundles" / "hippocampus_mri_3d"))
    parser.add_argument("--scans", nargs="+", default=[str(REPO.parent / "shared/data/msd_hippocampus/images")])
    parser.add_argument("--limit", type=int, default=200, help="at most this many scans")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--ways", nargs="+", default=["pipelined", "sequential", "reload"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    runtime.enable_allocator_tuning()  # as the command line does
    model = load_model(args.model, backend=args.backend)
    runtime.settle_heap()
    scans = expand_inputs(args.scans)[: args.limit]
    print(f"{len(scans)} scans from {args.scans[0]}{' ...' if len(args.scans) > 1 else ''}; model {args.model}")

    def pipelined(jobs: list[Job], stats: Path) -> None:
        run_jobs(jobs, model, extras=Extras(stats=stats))

    def sequential(jobs: list[Job], stats: Path) -> None:
        run_jobs(jobs, model, extras=Extras(stats=stats), pipelined=False)

    def reload(jobs: list[Job], stats: Path) -> None:
        for job in jobs:  # one statistics file per scan, as separate runs would write
            fresh = load_model(args.model, backend=args.backend)
            run_jobs([job], fresh, extras=Extras(stats=stats.with_name(f"{job.output.name}.csv")), pipelined=False)

    ways: dict[str, Callable[[list[Job], Path], None]] = {
        "pipelined": pipelined,
        "sequential": sequential,
        "reload": reload,
    }
    results = {}
    masks: dict[str, dict[str, np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="medunet-batch-") as tmp:
        for name in args.ways:
            out = Path(tmp) / name
            if len({scan_name(s[0]) for s in scans}) == len(scans):
                jobs = plan_jobs(scans, out, model.preprocess.spatial_dims)
            else:  # one file name in every case folder (BraTS): name the masks by their folders
                jobs = [Job(s, out / f"{s[0].parent.name}.nii.gz") for s in scans]
            with PeakMemory() as mem:
                start = time.perf_counter()
                ways[name](jobs, out / "stats.csv")
                seconds = time.perf_counter() - start
            results[name] = {"seconds": seconds, "per_minute": 60 * len(jobs) / seconds, "peak": mem.peak}
            masks[name] = {j.output.name: np.asarray(nib.load(j.output).dataobj) for j in jobs}
            print(f"{name:10s} {seconds:7.1f} s  {60 * len(jobs) / seconds:6.1f} scans/min  peak {gib(mem.peak)} GiB")
    first = args.ways[0]
    for name in args.ways[1:]:
        same = all(np.array_equal(masks[first][k], masks[name][k]) for k in masks[first])
        ratio = results[name]["seconds"] / results[first]["seconds"]
        print(f"{first} vs {name}: {ratio:.2f}x the scans per minute; masks identical: {same}")
    if args.json:
        args.json.write_text(json.dumps({"scans": len(scans), "model": args.model, "ways": results}, indent=2))


if __name__ == "__main__":
    main()
