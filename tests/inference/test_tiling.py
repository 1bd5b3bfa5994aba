"""Window and slab planning: the fewest windows that fit the memory budget, and a bounded peak."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers.utils import _get_scan_interval

import medunet
from medunet.config import NetworkConfig
from medunet.inference.backends import TorchEngine
from medunet.inference.predictor import _blend, _predictor, prepare
from medunet.inference.tiling import (
    CONTEXT_COVERAGE,
    WINDOW_OVERHEAD,
    GiB,
    Layout,
    MiB,
    TilePlan,
    TileRequest,
    blend_bytes_per_voxel,
    layout_windows,
    parse_memory,
    plan_tiles,
)
from medunet.io import load_image
from medunet.networks import describe_network
from medunet.runtime import _malloc_trim, _mallopt
from tests.conftest import make_blob_case

UNET_3D = NetworkConfig(name="unet", spatial_dims=3, in_channels=1, out_channels=3, features=(16, 32, 64, 128))


def plan_for(shape, cfg: NetworkConfig, patch, budget: int, committed: int, num_classes: int, **kw) -> TilePlan:  # type: ignore[no-untyped-def]
    """``plan_tiles`` for the network ``cfg`` builds."""
    return plan_tiles(TileRequest(shape, describe_network(cfg), patch, num_classes, budget, committed, **kw))


def window_bytes_per_voxel(cfg: NetworkConfig) -> float:
    return describe_network(cfg).activation_bytes_per_voxel()


def receptive_field(cfg: NetworkConfig) -> int:
    return max(describe_network(cfg).receptive_field)


def test_parse_memory() -> None:
    assert parse_memory("2GB") == 2 * 10**9
    assert parse_memory("1.5GiB") == int(1.5 * GiB)
    assert parse_memory("800 MiB") == 800 * MiB
    assert parse_memory("123") == 123
    for bad in ("lots", "2 parsecs", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_memory(bad)


def monai_windows(shape: tuple[int, ...], roi: tuple[int, ...], overlap: tuple[float, ...]) -> list[int]:
    """How many windows MONAI's sliding window actually places along each axis."""
    interval = _get_scan_interval(shape, roi, len(shape), overlap)
    return [1 if r >= s else math.ceil((s - r) / i) + 1 for s, r, i in zip(shape, roi, interval, strict=True)]


@pytest.mark.parametrize(
    "shape,max_voxels",
    [((240, 224, 160), 2_000_000), ((512, 512, 60), 1_500_000), ((35, 48, 32), 10**7), ((300, 41, 77), 300_000)],
)
def test_layout_fits_budget_and_overlaps_by_context(shape: tuple[int, ...], max_voxels: int) -> None:
    patch, multiple, context = (40, 56, 40), 8, 32
    layout = layout_windows(shape, max_voxels, patch, multiple, context)
    assert layout.window_voxels <= max_voxels
    assert list(layout.counts) == monai_windows(shape, layout.roi, layout.overlap)
    for s, r, n, p in zip(shape, layout.roi, layout.counts, patch, strict=True):
        assert r >= min(p, s) or r == p  # never below the training patch
        if n > 1:
            stride = (s - r) / (n - 1)
            assert r - stride >= context - 1e-6  # neighbours share at least the network's context
            assert r % multiple == 0
    # far fewer network voxels than MONAI's stock 96^3 windows at 50% overlap
    stock = math.prod(monai_windows(shape, (96, 96, 96), (0.5,) * 3)) * 96**3
    if min(shape) >= 96:
        assert layout.coverage(shape) * math.prod(shape) < stock / 2


@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.25, 0.5, 0.95])
def test_an_asked_overlap_is_kept_with_the_fewest_network_voxels(overlap: float) -> None:
    shape, patch, committed = (240, 240, 155), (64, 64, 64), 700 * MiB
    default = plan_for(shape, UNET_3D, patch, 2 * GiB, committed, num_classes=2)
    plan = plan_for(shape, UNET_3D, patch, 2 * GiB, committed, num_classes=2, overlap=overlap)
    layout = plan.layout
    assert layout.window_voxels * window_bytes_per_voxel(UNET_3D) <= plan.window_budget - WINDOW_OVERHEAD
    assert list(layout.counts) == monai_windows(shape, layout.roi, layout.overlap)
    intervals = _get_scan_interval(shape, layout.roi, 3, layout.overlap)
    for r, n, step in zip(layout.roi, layout.counts, intervals, strict=True):
        if n > 1:  # neighbours, as MONAI places them, share at least the asked fraction of a window
            assert r - step >= overlap * r - 1e-6
    # never more network voxels than the default windows with the asked overlap (a window more per axis)
    kept = math.prod(monai_windows(shape, default.layout.roi, (overlap,) * 3)) * default.layout.window_voxels
    assert layout.coverage(shape) * math.prod(shape) <= kept
    if overlap == 0.25:  # here 8 windows of 144x144x104 (1.93), against 3x3x1 of the default 128x128x155 (2.56)
        assert layout.coverage(shape) < 0.8 * kept / math.prod(shape)


def test_receptive_field_of_a_four_level_unet() -> None:
    assert receptive_field(UNET_3D) == 96
    assert receptive_field(replace(UNET_3D, features=(8, 16))) == 18


def test_large_ct_is_cut_into_slabs_within_budget() -> None:
    shape = (512, 512, 600)
    image = 4 * math.prod(shape)
    committed = 550 * MiB + image + 2 * math.prod(shape)  # process + float32 image + masks
    plan = plan_for(shape, UNET_3D, (40, 56, 40), 2 * GiB, committed, num_classes=3, image_bytes=image)
    assert plan.half_blend and plan.slab < 600 and plan.margin >= 8
    blend = math.prod((*shape[:-1], plan.slab + 2 * plan.margin)) * blend_bytes_per_voxel(3, half=True)
    window = plan.layout.window_voxels * plan.sw_batch_size * window_bytes_per_voxel(UNET_3D)
    assert committed - image // 2 + blend + window <= 0.8 * 2 * GiB  # the image is held in float16
    print(plan.describe(shape))
    assert "slabs" in plan.describe(shape)
    with pytest.raises(MemoryError, match="raise --max-memory"):
        plan_for(shape, UNET_3D, (40, 56, 40), 1 * GiB, committed, num_classes=3, image_bytes=image)


def window_invariant_model(model: medunet.inference.SegmentationModel) -> medunet.inference.SegmentationModel:
    """The same architecture with batch norm (fixed statistics in eval) and seeded random weights: its output
    does not depend on which window a voxel falls in, except through padding at window edges."""
    from medunet.networks import create_network

    torch.manual_seed(0)
    cfg = replace(model.network_config, norm="batch")
    net = create_network(cfg).eval()
    return replace(model, network=net, network_config=cfg)


@pytest.mark.slow
def test_slabs_and_small_windows_agree_with_one_pass(tiny_model: Path, tmp_path: Path) -> None:
    model = window_invariant_model(medunet.load_model(tiny_model))
    img, _ = make_blob_case(tmp_path, "big", seed=4, shape=(64, 72, 90))
    x = prepare(load_image(img, 3), model).x.as_tensor()
    shape, cfg, patch = tuple(x.shape[1:]), model.network_config, model.preprocess.patch_size
    run = _predictor(TorchEngine(model.network, channels_last=False), ())
    one_plan = plan_for(shape, cfg, patch, budget=4 * GiB, committed=0, num_classes=3)
    assert one_plan.slab == 90 and math.prod(one_plan.layout.counts) == 1 and not one_plan.half_blend
    cut_plan = plan_for(shape, cfg, patch, budget=7 * MiB, committed=0, num_classes=3)
    assert cut_plan.half_blend and cut_plan.slab < 90 and math.prod(cut_plan.layout.counts) > 1
    one, _ = _blend(x, run, one_plan, 3, torch.device("cpu"), keep_probs=False)
    cut, probs = _blend(x, run, cut_plan, 3, torch.device("cpu"), keep_probs=True)
    assert probs is not None and probs.dtype == torch.float16
    agree = (one == cut).float().mean().item()
    assert agree > 0.995, agree


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak from Linux /proc")
def test_peak_memory_stays_under_budget(tiny_model: Path, tmp_path: Path) -> None:
    """A real ``medunet infer`` process on a 32 M voxel scan (128 MB as float32) under a 1.2 GB budget."""
    shape = (320, 320, 320)
    rng = np.random.default_rng(0)
    data = rng.normal(size=(shape[0], shape[1], 1)).astype(np.float32) + np.zeros(shape, np.float32)
    path = tmp_path / "large.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    del data
    budget = 1_200_000_000
    # VmHWM is this process's own peak (ru_maxrss would include the forking test process's)
    code = (
        "import sys; from medunet.cli.main import main; sys.argv[0] = 'medunet';"
        "\ntry:\n    main()\nfinally:\n"
        "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "    print('PEAK', int(hwm) * 1024, file=sys.stderr)"
    )
    args = ["infer", str(path), "-o", str(tmp_path / "m.nii.gz"), "--model", str(tiny_model)]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args, "--max-memory", str(budget)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stderr.split("PEAK")[-1].split()[0])
    assert peak < budget, f"peak {peak / 1e9:.2f} GB over the {budget / 1e9:.2f} GB budget: {proc.stderr}"
    assert nib.load(tmp_path / "m.nii.gz").shape == shape


def _numbers_printed_by(code: str) -> list[int]:
    """Run ``code`` in a fresh Python (a heap of its own) and read the integers it prints."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [int(v) for v in proc.stdout.split()]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from Linux /proc")
@pytest.mark.skipif(_malloc_trim() is None, reason="glibc's malloc_trim is not in this C library")
def test_memory_a_previous_scan_freed_is_not_counted_as_taken() -> None:
    """glibc keeps freed heap pages resident; the planner hands them back before it measures."""
    code = (
        "import torch\n"
        "from medunet.inference.tiling import MiB, resident_memory\n"
        "from medunet.runtime import release_free_memory\n"
        "big = torch.ones(6 * MiB); del big\n"  # a freed 24 MiB mapping raises glibc's mmap threshold
        "before = resident_memory()\n"
        "tensors = [torch.ones(MiB) for _ in range(100)]\n"  # 4 MiB each, now from the heap
        "del tensors[::2]\n"  # 200 MiB freed between live blocks: the heap cannot shrink by itself
        "held = resident_memory() - before\n"
        "release_free_memory()\n"
        "assert all(float(t[-1]) == 1.0 for t in tensors)\n"
        "print(held // MiB, (resident_memory() - before) // MiB)"
    )
    held, after = _numbers_printed_by(code)
    assert held >= 390, "the freed tensors were handed back without a trim; the test no longer shows anything"
    assert after <= 230, f"{after} MiB still resident for 200 MiB of live tensors"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from Linux /proc")
@pytest.mark.skipif(_mallopt() is None or _malloc_trim() is None, reason="glibc's mallopt is not in this C library")
def test_freed_pages_stay_while_windows_run_and_go_back_after() -> None:
    """Inside ``freed_pages_kept`` a freed 256 MiB map stays for the next layer instead of being
    unmapped (and faulted in again); on exit it is handed back and glibc unmaps large blocks again.
    Only where the process allowed it, as the command line does: a library caller's allocator is left alone."""
    untouched = (
        "import torch\n"
        "from medunet.inference.tiling import MiB, resident_memory\n"
        "from medunet.runtime import freed_pages_kept, release_free_memory\n"
        "release_free_memory(); before = resident_memory()\n"
        "with freed_pages_kept():\n"
        "    big = torch.ones(64 * MiB); del big\n"
        "    kept = resident_memory() - before\n"
        "print(kept // MiB, 0, 0)"
    )
    assert _numbers_printed_by(untouched)[0] <= 16
    code = (
        "import torch\n"
        "from medunet import runtime\n"
        "from medunet.inference.tiling import MiB, resident_memory\n"
        "from medunet.runtime import freed_pages_kept, release_free_memory\n"
        "runtime.enable_allocator_tuning()\n"
        "release_free_memory(); before = resident_memory()\n"
        "with freed_pages_kept():\n"
        "    big = torch.ones(64 * MiB); del big\n"
        "    kept = resident_memory() - before\n"
        "after = resident_memory() - before\n"
        "big = torch.ones(64 * MiB); del big\n"
        "print(kept // MiB, after // MiB, (resident_memory() - before) // MiB)"
    )
    kept, after, later = _numbers_printed_by(code)
    assert kept >= 250, f"only {kept} MiB of a freed 256 MiB map stayed"
    assert after <= 16, f"{after} MiB still held after the context"
    assert later <= 16, f"{later} MiB held after a large block freed outside the context: the threshold stayed up"


def _shared_voxels(layout: Layout) -> list[int]:
    """Voxels neighbouring windows share on each split axis (MONAI's interval, ``int(roi * (1 - overlap))``)."""
    return [r - int(r * (1 - o)) for r, o, n in zip(layout.roi, layout.overlap, layout.counts, strict=True) if n > 1]


def test_windows_share_a_third_of_the_field_unless_that_doubles_the_work() -> None:
    """With batch norm a BraTS-sized scan keeps 32 voxels (a third of 96) between windows; a 512x512x600
    scan, whose windows a 2 GiB budget keeps small, would be covered more than twice with 32: 16."""
    cfg = replace(UNET_3D, norm="batch")
    assert receptive_field(cfg) == 96
    brats = (240, 240, 155)
    plan = plan_for(brats, cfg, (96, 96, 96), 2 * GiB, 700 * MiB, 3, image_bytes=4 * math.prod(brats))
    assert min(_shared_voxels(plan.layout)) >= 32
    assert plan.network_voxels(brats) <= CONTEXT_COVERAGE * math.prod(brats)

    ct = (512, 512, 600)
    args = (ct, cfg, (96, 96, 96), 2 * GiB, 600 * MiB + 4 * math.prod(ct), 3)
    plan = plan_for(*args, image_bytes=4 * math.prod(ct))
    wide = plan_for(*args, image_bytes=4 * math.prod(ct), context=32)
    assert wide.network_voxels(ct) > CONTEXT_COVERAGE * math.prod(ct)
    assert plan.network_voxels(ct) < wide.network_voxels(ct)
    assert min(_shared_voxels(plan.layout)) >= 16 and plan.margin == 8


def test_instance_norm_keeps_fewer_larger_windows() -> None:
    """A network whose output depends on its window's statistics keeps a sixth of the field (16 voxels):
    on the hippocampus mosaic's shape, 4 windows where the same network with batch norm buys a third
    with 8."""
    shape = (240, 224, 160)
    counts = {}
    for norm, context in (("instance", 16), ("batch", 32)):
        args = (shape, replace(UNET_3D, norm=norm), (96, 96, 96), 2 * GiB, 640 * MiB, 3)
        plan = plan_for(*args, image_bytes=4 * math.prod(shape))
        expected = plan_for(*args, image_bytes=4 * math.prod(shape), context=context)
        assert plan.layout == expected.layout
        counts[norm] = math.prod(plan.layout.counts)
    assert counts == {"instance": 4, "batch": 8}


def test_a_tight_budget_narrows_the_context_instead_of_refusing() -> None:
    """Windows too small to keep 32 or 16 voxels between them keep 8 (one stride)."""
    shape = (64, 72, 90)
    args = (shape, UNET_3D, (16, 16, 16), 80 * MiB, 0, 3)
    for context in (32, 16):
        with pytest.raises(MemoryError):
            plan_for(*args, context=context)
    plan = plan_for(*args)
    assert plan.layout == plan_for(*args, context=8).layout


def test_a_2d_network_over_a_volume_tiles_the_plane_only() -> None:
    cfg = NetworkConfig(name="unet", spatial_dims=2, in_channels=1, out_channels=2, features=(16, 32, 64, 128, 256))
    shape = (512, 512, 200)
    image = 4 * math.prod(shape)
    plan = plan_for(shape, cfg, (256, 256), 2 * GiB, 550 * MiB + image, 2, image_bytes=image, slice_wise=True)
    assert plan.slice_wise and plan.margin == 0
    assert plan.layout.roi[-1] == min(200, plan.slab) and plan.layout.counts[-1] == 1  # no windows along depth
    assert 1 <= plan.sw_batch_size <= 16  # slices per network call


def test_slabs_keep_their_depth_at_the_ends() -> None:
    shape = (512, 512, 300)
    image = 4 * math.prod(shape)
    plan = plan_for(shape, UNET_3D, (40, 56, 40), 2 * GiB, 550 * MiB + image, 3, image_bytes=image)
    assert plan.slab < 300
    bounds = [plan.slab_bounds(start, 300) for start in range(0, 300, plan.slab)]
    assert {hi - lo for lo, hi in bounds} == {plan.slab + 2 * plan.margin}  # never a short, padded slab
    for start, (lo, hi) in zip(range(0, 300, plan.slab), bounds, strict=True):
        assert lo <= start and min(300, start + plan.slab) <= hi
    assert plan.layout.roi[-1] <= plan.slab + 2 * plan.margin


def test_anisotropic_network_windows_follow_each_axis_stride_and_field() -> None:
    from medunet.networks.topology import receptive_field as fields
    from medunet.networks.topology import total_stride

    cfg = NetworkConfig(
        spatial_dims=3, in_channels=1, out_channels=4, features=(16, 32, 64, 128),
        strides=((1, 1, 1), (2, 2, 1), (2, 2, 1), (2, 2, 2)),
        kernel_sizes=((3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3)),
    )  # fmt: skip
    assert total_stride(cfg) == (8, 8, 2)
    assert fields(cfg)[2] < fields(cfg)[0]
    shape = (512, 512, 40)
    plan = plan_for(shape, cfg, (160, 160, 8), 1 * GiB, 300 * MiB, 4, image_bytes=4 * math.prod(shape))
    for r, s, m in zip(plan.layout.roi, (*shape[:2], plan.slab + 2 * plan.margin), (8, 8, 2), strict=True):
        assert r >= s or r % m == 0
    assert plan.network_voxels(shape) >= math.prod(shape)
