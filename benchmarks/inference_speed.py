"""medunet's inference path against MONAI's stock sliding-window recipe, same weights, same volume.

    python benchmarks/inference_speed.py [--model bundles/hippocampus_mri_3d] [--grid 6 4 4] [--device cpu]
    python benchmarks/inference_speed.py --model RUN/best.pt --scan FLAIR.nii.gz T1C.nii.gz --label SEG.nii.gz
    python benchmarks/inference_speed.py ... [--max-memory 6GB] [--overlap 0.25]   # medunet's plan, as in `infer`
    python benchmarks/inference_speed.py ... --backends torch onnxruntime openvino     # each backend, one table

The volume is a mosaic of real MSD hippocampus cases for the shipped default model, or a real scan
(``--scan``, one file per channel, with its ``--label`` file) for the model given.

Both paths share the preprocessing (orientation, z-score) and the mapping back to the input grid;
they differ in the window plan:

- stock: ``SlidingWindowInferer(roi_size=96³, sw_batch_size=4, overlap=0.5, mode="gaussian")``;
- medunet: the fewest, largest windows the memory budget allows, overlapping by the network's
  context, blended slab by slab (``medunet.inference.tiling``), at the default ``--max-memory``
  (or the ``--max-memory`` and ``--overlap`` given).

With ``--backends``, medunet's path runs once per backend (``medunet infer --backend``; ``openvino-bf16``
is OpenVINO at bfloat16 precision), each with the plan that backend gets, and a table gives each
one's time, speed-up against stock, peak memory, share of convolution throughput and Dice.

Printed: seconds and the time ratio, Dice agreement between the two masks (and of each with the
real labels), peak resident memory of each (sampled while it runs), and the share of the machine's
measured convolution throughput that each path achieves. ``--floor`` adds how far the stock recipe
moves when only its window grows to 112³; ``--untiled`` scores both masks against one pass of the
network over the whole volume, the answer no tiling can improve on.
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the medunet command does; applies to both paths

import argparse
import gc
import json
import math
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from volumes import REPO, tiled_volume

from medunet import runtime
from medunet.evaluation import dice_per_class
from medunet.inference import load_model
from medunet.inference.backends import Engine
from medunet.inference.model import SegmentationModel
from medunet.inference.predictor import InferOptions, _to_input_grid, prepare, segment_prepared
from medunet.inference.tiling import TilePlan, parse_memory, resident_memory
from medunet.transforms.loading import LoadCased


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self) -> PeakMemory:
        self.start = resident_memory()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, resident_memory())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_memory())


def conv_flops_per_voxel(network: torch.nn.Module, dims: int, in_channels: int, device: torch.device) -> float:
    """Multiply-adds x2 of every convolution, per input voxel (measured with hooks on a 64^dims window)."""
    total = 0.0

    def hook(module: torch.nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        k = math.prod(module.kernel_size)
        if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
            total += 2.0 * _inp[0].numel() * module.out_channels // module.groups * k
        else:
            total += 2.0 * out.numel() * module.in_channels // module.groups * k

    convs = [m for m in network.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    handles = [m.register_forward_hook(hook) for m in convs]
    x = torch.zeros(1, in_channels, *(64,) * dims, device=device)
    with torch.enable_grad():  # the plain forward, one module call per convolution (inference runs some in slabs)
        network(x)
    for h in handles:
        h.remove()
    return total / x[0, 0].numel()


def machine_conv_throughput(dims: int, device: torch.device, seconds: float = 3.0) -> float:
    """Best FLOP/s of single 3x3(x3) convolutions shaped like a U-Net's (float32, batch 1)."""
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    side = {3: [(16, 96), (32, 64), (64, 40)], 2: [(32, 512), (64, 256), (128, 128)]}[dims]
    best = 0.0
    for channels, size in side:
        layer = conv(channels, channels, 3, padding=1).to(device).eval()
        x = torch.randn(1, channels, *(size,) * dims, device=device)
        flops = 2.0 * channels * channels * 3**dims * size**dims
        with torch.inference_mode():
            layer(x)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / len(side):
                layer(x)
                n += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, flops * n / (time.perf_counter() - start))
    return best


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def dice(a: np.ndarray, b: np.ndarray, num_classes: int) -> list[float]:
    """Dice of classes 1..K-1 between two label maps (medunet's metric; a class absent from both scores 1)."""
    return [float(v) for v in dice_per_class(torch.from_numpy(a), torch.from_numpy(b), num_classes)]


def main() -> None:
    runtime.enable_allocator_tuning()  # as the medunet command runs inference
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "bundles" / "hippocampus_mri_3d"))
    parser.add_argument("--grid", type=int, nargs=3, default=(6, 4, 4), help="hippocampus boxes per axis")
    parser.add_argument("--scan", type=Path, nargs="+", default=None, help="a real scan instead (file per channel)")
    parser.add_argument("--label", type=Path, default=None, help="the scan's label file (values as in training)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--max-memory", default=None, help="medunet's budget, e.g. 6GB (default: medunet's default)")
    parser.add_argument(
        "--overlap", type=float, default=None, help="medunet's window overlap fraction, as `medunet infer "
        "--overlap` (default: as `medunet infer`)"
    )  # fmt: skip
    parser.add_argument(
        "--floor", action="store_true", help="also run the stock recipe with 112^3 windows: how much masks move "
        "with the tiling alone (instance norm makes a network's output depend on the window it sees)"
    )  # fmt: skip
    parser.add_argument(
        "--untiled", action="store_true", help="also run the network once over the whole volume (no windows, "
        "several GB): the answer without tiling, against which both paths' masks are scored"
    )  # fmt: skip
    parser.add_argument(
        "--repeat", type=int, default=1, help="run both paths this many times, alternating, and compare the "
        "median times (a shared machine's speed drifts by a fifth within minutes)"
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["torch"],
        choices=["torch", "onnxruntime", "openvino", "openvino-bf16"],
        help="medunet's path on each of these (the first is the one compared in detail)",
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat needs at least one round")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_model(args.model, device=device)
    runtime.settle_heap()  # as the command line does once its model is loaded
    if args.scan:
        if args.label is None:
            parser.error("--scan needs its --label")
        case = LoadCased(3, model.preprocess.label_map)({"image": args.scan, "label": args.label})
        volume, label = case["image"], case["label"].numpy()[0]
        origin = f"{args.scan[0].name} and {len(args.scan) - 1} more channel(s)"
    else:
        image, label, affine = tiled_volume(tuple(args.grid))
        volume = MetaTensor(torch.from_numpy(image)[None], affine=torch.from_numpy(affine))
        volume.meta["filename_or_obj"] = "tiled_hippocampus"
        origin = "real MSD hippocampus cases"
    shape = tuple(volume.shape[1:])
    voxels = math.prod(shape)
    print(f"volume {shape} ({voxels / 1e6:.1f} M voxels) from {origin}; model {args.model}")
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    num_classes = model.preprocess.num_classes

    # warm-up: one small window through both paths
    with torch.inference_mode():
        model.network(torch.zeros(1, model.network_config.in_channels, *model.preprocess.patch_size, device=device))

    def stock_recipe(roi: int) -> np.ndarray:
        prep = prepare(volume, model)  # a copy: medunet normalizes its own copy in place
        inferer = SlidingWindowInferer(roi_size=(roi,) * 3, sw_batch_size=4, overlap=0.5, mode="gaussian")
        with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = inferer(prep.x.as_tensor()[None].to(device), model.network)
        labels = torch.as_tensor(logits)[0].argmax(0).to(torch.uint8).cpu()
        del logits
        return _to_input_grid(prep, labels, None, resampled=False)[0].numpy()

    def untiled_labels() -> np.ndarray:
        prep = prepare(volume, model)
        with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = model.network(prep.x.as_tensor()[None].to(device))  # the network pads to its stride
        labels = torch.as_tensor(logits)[0].argmax(0).to(torch.uint8).cpu()
        del logits
        return _to_input_grid(prep, labels, None, resampled=False)[0].numpy()

    graph: list[bytes] = []  # the ONNX graph, exported once for every runtime

    def backend_model(name: str) -> SegmentationModel:
        """``model`` on backend ``name``, built before each timed run and dropped after it, so that
        no runtime's buffers are resident while another is planned against the memory budget."""
        if name == "torch":
            return model
        from medunet.inference.backends import OnnxRuntimeEngine, OpenVinoEngine
        from medunet.inference.export import to_onnx
        from medunet.networks.topology import total_stride

        if not graph:
            graph.append(to_onnx(model))
        stride = total_stride(model.network_config)
        engine: Engine
        if name == "onnxruntime":
            engine = OnnxRuntimeEngine(graph[0], stride)
        else:
            engine = OpenVinoEngine(graph[0], stride, precision="bf16" if name == "openvino-bf16" else "f32")
        built = replace(model, engine=engine)
        built.window_engine()(torch.zeros(1, model.network_config.in_channels, *model.preprocess.patch_size))
        return built  # warmed up: a runtime's first call compiles its kernels

    def medunet_path(which: SegmentationModel = model) -> tuple[np.ndarray, TilePlan, tuple[int, ...]]:
        prep = prepare(volume, which)
        budget = parse_memory(args.max_memory) if args.max_memory else None
        seg = segment_prepared(prep, which, InferOptions(max_memory=budget, overlap=args.overlap))
        assert seg.plan is not None
        return seg.labels.numpy(), seg.plan, tuple(prep.x.shape[1:])

    # stock first, so that it is not the one running on memory the other left behind; with --repeat
    # the two alternate and the medians are compared (peaks are the first round's)
    times_stock: list[float] = []
    times_ours: list[float] = []
    mems_stock: list[PeakMemory] = []
    mems_ours: list[PeakMemory] = []
    others: dict[str, dict] = {name: {"times": [], "mems": []} for name in args.backends[1:]}
    floor = None
    for _ in range(args.repeat):
        gc.collect()
        with PeakMemory() as mem:
            start = time.perf_counter()
            stock = stock_recipe(96)
            times_stock.append(time.perf_counter() - start)
        mems_stock.append(mem)
        if args.floor and floor is None:
            floor = dice(stock_recipe(112), stock, num_classes)
        first = backend_model(args.backends[0])  # built and warmed up outside the timing, as the others
        gc.collect()
        with PeakMemory() as mem:
            start = time.perf_counter()
            ours, plan, prep_shape = medunet_path(first)
            times_ours.append(time.perf_counter() - start)
        mems_ours.append(mem)
        del first
        for name, record in others.items():
            variant = backend_model(name)
            gc.collect()
            with PeakMemory() as mem:
                start = time.perf_counter()
                record["labels"], record["plan"], _ = medunet_path(variant)
                record["times"].append(time.perf_counter() - start)
            record["mems"].append(mem)
            del variant
    t_stock, t_ours = float(np.median(times_stock)), float(np.median(times_ours))
    mem_stock, mem_ours = mems_stock[0], mems_ours[0]

    # after medunet's path: its several GB would otherwise shrink the budget medunet plans with
    untiled = untiled_labels() if args.untiled else None
    agree = dice(ours, stock, num_classes)
    ours_vs_label, stock_vs_label = dice(ours, label, num_classes), dice(stock, label, num_classes)
    per_voxel = conv_flops_per_voxel(model.network, 3, model.network_config.in_channels, device)
    stock_windows = math.prod(1 if s <= 96 else math.ceil((s - 96) / 48) + 1 for s in shape) * 96**3
    peak = machine_conv_throughput(3, device)
    ours_windows = plan.network_voxels(prep_shape)
    achieved_ours = per_voxel * ours_windows / t_ours
    achieved_stock = per_voxel * stock_windows / t_stock

    print(
        f"medunet: {t_ours:7.1f} s  peak {gib(mem_ours.peak)} GiB (+{gib(mem_ours.peak - mem_ours.start)})"
        f"  {plan.describe(prep_shape)}"
    )
    print(
        f"stock:   {t_stock:7.1f} s  peak {gib(mem_stock.peak)} GiB (+{gib(mem_stock.peak - mem_stock.start)})"
        f"  windows 96^3, overlap 0.5, coverage {stock_windows / voxels:.2f}"
    )
    print(f"speed-up: {t_stock / t_ours:.2f}x")
    if args.repeat > 1:
        rounds = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(times_ours, times_stock, strict=True))
        print(f"  medians of {args.repeat} alternating rounds (medunet/stock s: {rounds})")
    print(
        "agreement (Dice medunet vs stock): "
        + ", ".join(f"{n} {d:.4f}" for n, d in zip(model.label_names[1:], agree, strict=True))
        + f"; mean {np.mean(agree):.4f}"
    )
    if floor is not None:
        print(
            "tiling alone (Dice stock 112^3 vs stock 96^3): "
            + ", ".join(f"{n} {d:.4f}" for n, d in zip(model.label_names[1:], floor, strict=True))
            + f"; mean {np.mean(floor):.4f}"
        )
    if untiled is not None:
        to_untiled = {"medunet": dice(ours, untiled, num_classes), "stock": dice(stock, untiled, num_classes)}
        parts = [f"{k} {', '.join(f'{d:.4f}' for d in v)} (mean {np.mean(v):.4f})" for k, v in to_untiled.items()]
        print("agreement with the untiled network (one pass over the whole volume): " + "; ".join(parts))
    print(
        "Dice vs labels: medunet "
        + ", ".join(f"{d:.4f}" for d in ours_vs_label)
        + "; stock "
        + ", ".join(f"{d:.4f}" for d in stock_vs_label)
    )
    print(
        f"convolutions: {per_voxel / 1e3:.1f} kFLOP per window voxel; "
        f"machine best single conv {peak / 1e9:.1f} GFLOP/s; "
        f"medunet achieves {achieved_ours / 1e9:.1f} GFLOP/s ({achieved_ours / peak:.0%}), "
        f"stock {achieved_stock / 1e9:.1f} GFLOP/s ({achieved_stock / peak:.0%})"
    )
    table = []
    print("\n| path | seconds | speed-up vs stock | peak GiB | conv throughput | Dice vs labels | vs stock |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = [("stock 96^3/0.5 (torch)", t_stock, mem_stock, stock, stock_windows)]
    rows.append((f"medunet {args.backends[0]}", t_ours, mem_ours, ours, ours_windows))
    for name, record in others.items():
        windows = record["plan"].network_voxels(prep_shape)
        seconds = float(np.median(record["times"]))
        rows.append((f"medunet {name}", seconds, record["mems"][0], record["labels"], windows))
    for name, seconds, mem, labels, windows in rows:
        fraction = per_voxel * windows / seconds / peak
        vs_label, vs_stock = dice(labels, label, num_classes), dice(labels, stock, num_classes)
        print(
            f"| {name} | {seconds:.2f} | {t_stock / seconds:.2f}x | {gib(mem.peak)} | {fraction:.0%} | "
            f"{np.mean(vs_label):.4f} | {np.mean(vs_stock):.4f} |"
        )
        table.append(
            {"path": name, "seconds": seconds, "speedup": t_stock / seconds, "peak": mem.peak,
             "conv_fraction": fraction, "dice_labels": vs_label, "dice_stock": vs_stock}
        )  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "shape": shape,
                    "device": str(device),
                    "seconds_medunet": t_ours,
                    "seconds_stock": t_stock,
                    "rounds_medunet": times_ours,
                    "rounds_stock": times_stock,
                    "speedup": t_stock / t_ours,
                    "plan": plan.describe(prep_shape),
                    "agreement": agree,
                    "dice_medunet": ours_vs_label,
                    "dice_stock": stock_vs_label,
                    "peak_medunet": mem_ours.peak,
                    "peak_stock": mem_stock.peak,
                    "conv_peak_flops": peak,
                    "fraction_medunet": achieved_ours / peak,
                    "tiling_floor": floor,
                    "untiled_agreement": to_untiled if untiled is not None else None,
                    "fraction_stock": achieved_stock / peak,
                    "backends": table,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
