"""Contract tests run over every registered network, in 2D and 3D."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medunet.config import NetworkConfig
from medunet.networks import AttentionUNet, UNet, create_network, describe_network, list_networks
from medunet.networks import unet as unet_module

CASES = [(name, dims) for name in list_networks() for dims in (2, 3)]


def build(name: str, dims: int, **kw) -> torch.nn.Module:
    return create_network(
        NetworkConfig(name=name, spatial_dims=dims, in_channels=2, out_channels=3, features=(4, 8, 16), **kw)
    )


def shape(dims: int, size: int = 16, batch: int = 2) -> tuple[int, ...]:
    return (batch, 2) + (size,) * dims


@pytest.mark.parametrize(("name", "dims"), CASES)
def test_output_shape_and_backward(name: str, dims: int) -> None:
    net = build(name, dims)
    x = torch.randn(shape(dims), requires_grad=True)
    y = net(x)
    assert y.shape == (2, 3) + (16,) * dims
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize(("name", "dims"), CASES)
def test_sizes_not_multiple_of_stride(name: str, dims: int) -> None:
    net = build(name, dims).eval()
    size = (13, 10, 7)[:dims]
    y = net(torch.randn((1, 2, *size)))
    assert y.shape == (1, 3, *size)


@pytest.mark.parametrize(("name", "dims"), CASES)
def test_wrong_input_refused(name: str, dims: int) -> None:
    net = build(name, dims)
    with pytest.raises(ValueError, match="expected input"):
        net(torch.randn((1, 1) + (16,) * dims))  # one channel, two expected
    with pytest.raises(ValueError, match="expected input"):
        net(torch.randn((1, 2) + (16,) * (dims + 1)))


@pytest.mark.parametrize(("name", "dims"), CASES)
def test_state_dict_round_trip(name: str, dims: int) -> None:
    net, other = build(name, dims).eval(), build(name, dims).eval()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(shape(dims, batch=1))
    torch.testing.assert_close(net(x), other(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(("name", "dims"), CASES)
def test_torchscript_matches_eager(name: str, dims: int) -> None:
    net = build(name, dims).eval()
    scripted = torch.jit.script(net)
    x = torch.randn((1, 2, *(12, 20, 9)[:dims]))
    torch.testing.assert_close(scripted(x), net(x))


@pytest.mark.parametrize(("name", "dims"), CASES)
def test_deep_supervision(name: str, dims: int) -> None:
    net = build(name, dims, deep_supervision=True, deep_supervision_levels=1)
    y = net(torch.randn(shape(dims)))
    assert y.shape == (2, 2, 3) + (16,) * dims  # full-resolution head + one auxiliary head
    net.eval()
    assert net(torch.randn(shape(dims))).shape == (2, 3) + (16,) * dims


def test_attention_gates_only_in_attention_unet() -> None:
    plain, gated = build("unet", 3), build("attention_unet", 3)
    assert isinstance(gated, AttentionUNet) and type(plain) is UNet
    assert not any("gates.0.psi" in k for k in plain.state_dict())
    assert any("gates.0.psi" in k for k in gated.state_dict())


@pytest.mark.parametrize(
    "option",
    [{"upsample": "interpolate"}, {"downsample": "maxpool"}, {"norm": "batch"}, {"norm": "group"}, {"act": "relu"}],
)
def test_options(option: dict) -> None:
    net = build("unet", 3, **option)
    assert net(torch.randn(shape(3))).shape == (2, 3, 16, 16, 16)


def test_unknown_network_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="attention_unet, unet"):
        create_network(NetworkConfig(name="vnet"))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(23, 18, 11), (16, 9, 13)])
@pytest.mark.parametrize(
    ("norm", "upsample", "act"),
    [("instance", "transpose", "leakyrelu"), ("batch", "interpolate", "gelu"), ("none", "transpose", "relu")],
)
def test_inference_in_slabs_equals_forward(
    monkeypatch: pytest.MonkeyPatch, size: tuple[int, ...], norm: str, upsample: str, act: str, channels_last: bool
) -> None:
    """Without autograd the full-resolution level runs slab by slab (three or four rows at a time here) and
    in place; the logits are those of the plain forward, in either memory layout."""
    monkeypatch.setattr(unet_module, "LEAN_SLAB_VOXELS", 40)
    monkeypatch.setattr(unet_module, "LEAN_SLAB_ROWS", 3)  # 7 or 8 slabs, odd sizes and edges
    net = build("unet", 3, norm=norm, upsample=upsample, act=act).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(-0.5, 0.5)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn((2, 2, *size))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    plain = net(x).detach()  # autograd on: the plain forward
    with torch.inference_mode():
        lean, slabbed = forward_watching_slabs(net, x)
    assert slabbed
    assert lean.shape == plain.shape == (2, 3, *size)
    scale = max(1.0, float(plain.abs().max()))  # without a norm the logits reach ~1e4: float32 rounding scales
    torch.testing.assert_close(lean, plain, rtol=1e-4, atol=1e-5 * scale)


def forward_watching_slabs(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``net(x)``, and whether the forward ran the full-resolution level in slabs."""
    calls: list[int] = []
    plain_lean = net._forward_lean
    net._forward_lean = lambda t: (calls.append(1), plain_lean(t))[1]
    try:
        return net(x), bool(calls)
    finally:
        del net._forward_lean


@pytest.mark.parametrize(
    ("name", "dims", "norm", "slabs"),
    [
        ("unet", 3, "instance", True),
        ("unet", 3, "batch", True),
        ("unet", 3, "none", True),
        ("unet", 3, "group", False),
        ("unet", 2, "instance", False),
        ("attention_unet", 3, "instance", False),
    ],
)
def test_the_slab_forward_runs_where_the_description_says(name: str, dims: int, norm: str, slabs: bool) -> None:
    net = build(name, dims, norm=norm).eval()
    assert describe_network(net.config).slab_forward is slabs
    x = torch.randn(shape(dims, batch=1))
    with torch.inference_mode():
        assert forward_watching_slabs(net, x)[1] is slabs
    net.train()
    with torch.inference_mode():
        assert not forward_watching_slabs(net, x)[1]  # training mode: the plain forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_instance_norm_in_place_matches_torch(dtype: torch.dtype) -> None:
    """Half-precision maps (CUDA autocast) keep their dtype; their statistics are taken in float64."""
    norm = torch.nn.InstanceNorm3d(4, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 4, 3 * unet_module.LEAN_SLAB_ROWS + 5, 12, 9) * 3 + 1  # several slabs
    expected = torch.nn.functional.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=norm.eps)
    y = x.to(dtype)
    with torch.no_grad():
        unet_module._norm_in_place(norm, y)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_a_few_channel_slab_keeps_its_channels_last_layout() -> None:
    """PyTorch sends a one-sample, two-channel slab of a few rows to its generic convolution, which is
    several times slower and answers channels-first; the slab convolution keeps oneDNN and the layout."""
    x = torch.randn(1, 2, 19, 136, 96).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(16, 2, 3, 3, 3)
    with torch.inference_mode():
        y = unet_module._conv_stride1(x, w, [0, 1, 1])
        expected = torch.nn.functional.conv3d(x, w, None, 1, (0, 1, 1))
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    if torch.backends.mkldnn.is_available():
        assert y.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_channel_statistics_match_float64(layout: torch.memory_format) -> None:
    """The CPU statistics of instance norm, over several row blocks, on maps far from zero mean."""
    x = (torch.randn(2, 5, 31, 17, 13) * 3 + 100).contiguous(memory_format=layout)
    var, mean = unet_module._var_mean_cpu(x, rows=1000)
    var64, mean64 = torch.var_mean(x.double(), dim=(2, 3, 4), correction=0, keepdim=True)
    assert var.shape == mean.shape == (2, 5, 1, 1, 1)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=0)


ANISOTROPIC = {
    2: {"strides": ((1, 1), (2, 1), (2, 2)), "kernel_sizes": ((3, 1), (3, 3), (3, 3))},
    3: {"strides": ((1, 1, 1), (2, 2, 1), (2, 2, 2)), "kernel_sizes": ((3, 3, 1), (3, 3, 3), (3, 3, 3))},
}
ANISO_CASES = [(name, dims) for name in list_networks() for dims in (2, 3)]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(("name", "dims"), ANISO_CASES)
def test_anisotropic_strides_and_kernels(name: str, dims: int) -> None:
    from medunet.networks.topology import receptive_field, total_stride

    net = build(name, dims, **ANISOTROPIC[dims])
    cfg = net.config
    assert total_stride(cfg) == ((4, 2) if dims == 2 else (4, 4, 2))
    fields = receptive_field(cfg)
    assert fields[-1] < fields[0]  # the thick axis sees fewer voxels
    size = (13, 10, 7)[:dims]  # no multiple of the strides
    x = torch.randn((2, 2, *size), requires_grad=True)
    y = net(x)
    assert y.shape == (2, 3, *size)
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    scripted = torch.jit.script(net)
    with torch.no_grad():
        assert torch.allclose(scripted(x.detach()), net(x.detach()), atol=1e-5)


def test_anisotropic_slab_forward_equals_the_plain_one() -> None:
    cfg = NetworkConfig(
        spatial_dims=3, in_channels=1, out_channels=4, features=(4, 8, 16, 32),
        strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 1)),
        kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    )  # fmt: skip
    net = create_network(cfg).eval()
    x = torch.randn(1, 1, 20, 36, 40)
    plain = net(x).detach()  # autograd on: the plain forward
    with torch.no_grad():
        lean, slabbed = forward_watching_slabs(net, x)
    assert slabbed
    assert torch.allclose(lean, plain, atol=1e-4)


def test_strides_that_do_not_fit_the_levels_are_refused() -> None:
    with pytest.raises(ValueError, match="needs 3 levels"):
        build("unet", 3, strides=((1, 1, 1), (2, 2, 2)))
    with pytest.raises(ValueError, match="first level is all 1"):
        build("unet", 2, strides=((2, 2), (2, 2), (2, 2)))
    with pytest.raises(ValueError, match="odd"):
        build("unet", 2, kernel_sizes=((3, 2), (3, 3), (3, 3)))


# --- what each network says about itself (medunet.networks.description), held to the module ---

DESCRIBED = [
    NetworkConfig(
        name=name, spatial_dims=dims, in_channels=2, out_channels=3, features=(4, 8, 16), norm="batch", **aniso
    )
    for name in list_networks()
    for dims in (2, 3)
    for aniso in ({}, ANISOTROPIC[dims])
]


@pytest.mark.parametrize(
    "cfg", DESCRIBED, ids=lambda c: f"{c.name}-{c.spatial_dims}d-{'aniso' if c.strides else 'iso'}"
)
def test_stride_and_receptive_field_are_the_modules(cfg: NetworkConfig) -> None:
    """A change at one input voxel reaches output voxels across at most the receptive field (and most of
    it); an input side that is a multiple of the stride is not padded (the output is the input's size)."""
    description = describe_network(cfg)
    net = create_network(cfg).eval()
    assert description.spatial_dims == cfg.spatial_dims and tuple(net.stride) == description.stride
    size = [2 * f + 8 for f in description.receptive_field]
    x = torch.randn((1, 2, *size))
    nudged = x.clone()
    centre = tuple(s // 2 for s in size)
    nudged[(0, 0, *centre)] += 10.0
    with torch.no_grad():
        changed = (net(nudged) - net(x)).abs().amax(dim=(0, 1)) > 0
    for axis, field in enumerate(description.receptive_field):
        others = tuple(a for a in range(cfg.spatial_dims) if a != axis)
        reached = changed.any(dim=others).nonzero().flatten()
        extent = int(reached.max() - reached.min()) + 1
        assert 0.6 * field <= extent <= field, (axis, extent, field)


@pytest.mark.parametrize(
    ("norm", "statistics"), [("instance", True), ("group", True), ("batch", False), ("none", False)]
)
def test_window_statistics_as_described(norm: str, statistics: bool) -> None:
    """With per-window statistics, one voxel changes the output far beyond the receptive field."""
    cfg = NetworkConfig(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 8, 16), norm=norm)
    description = describe_network(cfg)
    assert description.window_statistics is statistics
    net = create_network(cfg).eval()
    x = torch.randn(1, 1, 128, 128)
    nudged = x.clone()
    nudged[0, 0, 2, 2] += 50.0
    with torch.no_grad():
        far = (net(nudged) - net(x))[..., -16:, -16:].abs().max()  # more than a receptive field away
    assert max(description.receptive_field) < 110
    assert bool(far > 1e-6) is statistics


@pytest.mark.parametrize(
    "cfg", DESCRIBED, ids=lambda c: f"{c.name}-{c.spatial_dims}d-{'aniso' if c.strides else 'iso'}"
)
def test_flops_match_a_counted_forward(cfg: NetworkConfig) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    net = create_network(cfg).eval()
    window = (32, 24, 16)[: cfg.spatial_dims]
    counter = FlopCounterMode(display=False)
    with counter:  # autograd on: the plain forward, whose convolutions the counter knows
        net(torch.randn((1, 2, *window)))
    counted = counter.get_total_flops()
    assert describe_network(cfg).flops(window) == pytest.approx(counted, rel=0.02)
    ensemble = describe_network(dataclasses.replace(cfg, ensemble=3))
    assert ensemble.flops(window) == pytest.approx(3 * counted, rel=0.02)


_MEASURE = """
import json, math, sys, torch
from medunet.config import NetworkConfig
from medunet.networks import create_network
torch.set_num_threads(1)

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

def peak(net, x):  # the process's peak resident memory during one forward, above where it started
    with torch.no_grad():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current size
        base = status("VmRSS:")
        y = net(x)
        del y
        return status("VmHWM:") - base

out = []
for raw, small, large in json.loads(sys.argv[1]):
    net = create_network(NetworkConfig(**raw)).eval()
    xs, xl = torch.randn(1, raw["in_channels"], *small), torch.randn(1, raw["in_channels"], *large)
    peak(net, xs)
    out.append((peak(net, xl) - peak(net, xs)) / (math.prod(large) - math.prod(small)))
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-memory reset")
def test_activation_memory_estimate_against_a_measured_forward() -> None:
    """Every registered network, 2D and 3D (3D with and without the slab forward): the memory a forward
    adds per window voxel, measured between two window sizes (so fixed costs cancel) in a fresh process
    whose allocator hands every freed block back at once (its peak is then the tensors' peak), lies
    between the description's estimate and a quarter of it. The estimate is the planner's: above the
    tensors' own peak, because the command line's allocator keeps freed pages while windows run."""
    cases = []
    for name in list_networks():
        for dims, norm in ((2, "instance"), (3, "instance"), (3, "group")):
            if name != "unet" and norm == "group":
                continue
            raw = dict(name=name, spatial_dims=dims, in_channels=2, out_channels=3, features=[8, 16, 32], norm=norm)
            sizes = ([256, 256], [512, 384]) if dims == 2 else ([64, 64, 32], [96, 96, 64])
            cases.append((raw, *sizes))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(cases)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    for (raw, _, _), per_voxel in zip(cases, measured, strict=True):
        description = describe_network(NetworkConfig(**{**raw, "features": tuple(raw["features"])}))
        estimate = description.activation_bytes_per_voxel(slab_forward=True)
        assert per_voxel <= estimate <= 4 * per_voxel, (raw, per_voxel, estimate)
