"""Building blocks shared by the U-Net family; ops are looked up once from ``spatial_dims``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medunet.config import Act, Norm, Upsample


@dataclass(frozen=True)
class Ops:
    """Dimension-specific layer constructors, so one network class serves 2D and 3D."""

    spatial_dims: int

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")

    @property
    def conv(self) -> type[nn.Module]:
        return nn.Conv2d if self.spatial_dims == 2 else nn.Conv3d

    @property
    def conv_transpose(self) -> type[nn.Module]:
        return nn.ConvTranspose2d if self.spatial_dims == 2 else nn.ConvTranspose3d

    @property
    def maxpool(self) -> type[nn.Module]:
        return nn.MaxPool2d if self.spatial_dims == 2 else nn.MaxPool3d

    @property
    def interp_mode(self) -> str:
        return "bilinear" if self.spatial_dims == 2 else "trilinear"

    def norm(self, kind: Norm, channels: int) -> nn.Module:
        cls: type[nn.Module]
        if kind is Norm.INSTANCE:
            cls = nn.InstanceNorm2d if self.spatial_dims == 2 else nn.InstanceNorm3d
            return cls(channels, affine=True)
        if kind is Norm.BATCH:
            cls = nn.BatchNorm2d if self.spatial_dims == 2 else nn.BatchNorm3d
            return cls(channels)
        if kind is Norm.GROUP:
            return nn.GroupNorm(min(8, channels), channels)
        return nn.Identity()


def make_act(kind: Act) -> nn.Module:
    if kind is Act.RELU:
        return nn.ReLU(inplace=True)
    if kind is Act.LEAKYRELU:
        return nn.LeakyReLU(0.01, inplace=True)
    return nn.GELU()


class ConvBlock(nn.Sequential):
    """Two (conv k -> norm -> activation) layers; the first may stride to downsample. ``kernel`` and
    ``stride`` are per axis (or one value for all), kernels odd with 'same' padding.

    ``(B, C_in, *S) -> (B, C_out, *S / stride)``
    """

    def __init__(
        self,
        ops: Ops,
        c_in: int,
        c_out: int,
        norm: Norm,
        act: Act,
        stride: int | tuple[int, ...] = 1,
        dropout: float = 0.0,
        kernel: int | tuple[int, ...] = 3,
    ) -> None:
        k = (kernel,) * ops.spatial_dims if isinstance(kernel, int) else tuple(kernel)
        pad = tuple(v // 2 for v in k)
        layers: list[nn.Module] = [
            ops.conv(c_in, c_out, k, stride=stride, padding=pad, bias=norm is Norm.NONE),
            ops.norm(norm, c_out),
            make_act(act),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [
            ops.conv(c_out, c_out, k, padding=pad, bias=norm is Norm.NONE),
            ops.norm(norm, c_out),
            make_act(act),
        ]
        super().__init__(*layers)


class UpBlock(nn.Module):
    """Multiplies the resolution by ``scale`` (per axis, default 2) and sets the channels:
    ``(B, C_in, *S) -> (B, C_out, *S * scale)``."""

    def __init__(self, ops: Ops, c_in: int, c_out: int, mode: Upsample, scale: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.mode = mode
        self.interp_mode = ops.interp_mode
        self.scale = tuple(scale) if scale is not None else (2,) * ops.spatial_dims
        self.scale_factor = [float(s) for s in self.scale]
        if mode is Upsample.TRANSPOSE:
            self.proj = ops.conv_transpose(c_in, c_out, self.scale, stride=self.scale)
        else:
            self.proj = ops.conv(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is Upsample.INTERPOLATE:
            x = nn.functional.interpolate(x, scale_factor=self.scale_factor, mode=self.interp_mode, align_corners=False)
        return self.proj(x)


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018) on a skip connection.

    ``skip`` (B, C_s, *S) is weighted by ``sigmoid(psi(act(W_x skip + W_g gate)))`` where ``gate``
    (B, C_g, *S) is the decoder feature brought to the skip's resolution.
    """

    def __init__(self, ops: Ops, c_skip: int, c_gate: int, c_inter: int, norm: Norm) -> None:
        super().__init__()
        self.w_x = nn.Sequential(ops.conv(c_skip, c_inter, 1, bias=False), ops.norm(norm, c_inter))
        self.w_g = nn.Sequential(ops.conv(c_gate, c_inter, 1, bias=False), ops.norm(norm, c_inter))
        self.psi = nn.Sequential(ops.conv(c_inter, 1, 1), nn.Sigmoid())
        self.act = nn.ReLU(inplace=True)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        alpha = self.psi(self.act(self.w_x(skip) + self.w_g(gate)))
        return skip * alpha


class PassSkip(nn.Module):
    """The ungated skip: same call signature as ``AttentionGate``, returns ``skip`` unchanged."""

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return skip
