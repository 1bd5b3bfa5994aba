"""U-Net and Attention U-Net for 2D and 3D images.

The forward reads like the diagram: an encoder of ``len(features)`` levels, each two 3x3 convolutions
with norm and activation; a decoder that upsamples, (optionally gates) and concatenates the skip, then
two more convolutions; a 1x1 head. Inputs of any size are padded to a multiple of the total stride
and the output is cropped back, so ``forward`` maps ``(B, C_in, *S) -> (B, C_out, *S)``.
"""

from __future__ import annotations

import torch
from torch import nn

from medunet.config import NetworkConfig
from medunet.networks.blocks import Act, AttentionGate, ConvBlock, Downsample, Norm, Ops, PassSkip, UpBlock, Upsample


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with configurable depth, width, norm and upsampling.

    With ``deep_supervision`` and in training mode, the output is ``(B, K, C_out, *S)``: the
    full-resolution head followed by ``K - 1`` lower-resolution heads upsampled to ``S``
    (the layout of MONAI's DynUNet, so the return type is always a tensor).
    """

    use_attention = False

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        ops = Ops(cfg.spatial_dims)
        norm, act = Norm(cfg.norm), Act(cfg.act)
        down, up = Downsample(cfg.downsample), Upsample(cfg.upsample)
        feats = list(cfg.features)
        if len(feats) < 2:
            raise ValueError("features needs at least two levels, e.g. (32, 64)")
        self.config = cfg  # not used in forward, so TorchScript leaves it out
        self.spatial_dims = cfg.spatial_dims
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.stride = 2 ** (len(feats) - 1)
        self.deep_supervision = cfg.deep_supervision
        self.interp_mode = ops.interp_mode

        self.encoder = nn.ModuleList()
        for level, c_out in enumerate(feats):
            c_in = cfg.in_channels if level == 0 else feats[level - 1]
            stride = 2 if (level > 0 and down is Downsample.CONV) else 1
            block = ConvBlock(ops, c_in, c_out, norm, act, stride=stride, dropout=cfg.dropout)
            if level > 0 and down is Downsample.MAXPOOL:
                self.encoder.append(nn.Sequential(ops.maxpool(2), block))
            else:
                self.encoder.append(block)

        n_decoder = len(feats) - 1
        self.n_aux = min(cfg.deep_supervision_levels, n_decoder - 1) if cfg.deep_supervision else 0
        self.ups = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.aux_heads = nn.ModuleList()  # one per decoder level; a conv only where deep supervision reads it
        for i, level in enumerate(range(len(feats) - 2, -1, -1)):
            c_skip, c_deep = feats[level], feats[level + 1]
            self.ups.append(UpBlock(ops, c_deep, c_skip, up))
            if self.use_attention:
                self.gates.append(AttentionGate(ops, c_skip, c_skip, max(c_skip // 2, 1), norm))
            else:
                self.gates.append(PassSkip())
            self.decoder.append(ConvBlock(ops, 2 * c_skip, c_skip, norm, act))
            is_aux = n_decoder - 1 - self.n_aux <= i < n_decoder - 1
            self.aux_heads.append(ops.conv(c_skip, cfg.out_channels, 1) if is_aux else nn.Identity())
        self.head = ops.conv(feats[0], cfg.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, {'H, W' if self.spatial_dims == 2 else 'H, W, D'}), "
                f"got {list(x.shape)}"
            )
        size: list[int] = list(x.shape[2:])
        x = self._pad(x)
        skips: list[torch.Tensor] = []
        for enc in self.encoder:
            x = enc(x)
            skips.append(x)
        x = skips.pop()
        outputs: list[torch.Tensor] = []
        n_levels = len(self.decoder)
        for i, (up, gate, dec, aux_head) in enumerate(zip(self.ups, self.gates, self.decoder, self.aux_heads)):  # noqa: B905 (TorchScript)
            skip = skips.pop()
            x = up(x)
            skip = gate(skip, x)
            x = dec(torch.cat([skip, x], dim=1))
            if self.training and n_levels - 1 - self.n_aux <= i < n_levels - 1:
                outputs.append(aux_head(x))
        out = self._crop(self.head(x), size)
        if self.training and self.n_aux > 0:
            full = x.shape[2:]
            aux = [
                self._crop(nn.functional.interpolate(o, size=full, mode=self.interp_mode), size) for o in outputs[::-1]
            ]
            return torch.stack([out] + aux, dim=1)  # noqa: RUF005 (TorchScript has no list unpacking)
        return out

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        pad: list[int] = []
        for s in x.shape[2:][::-1]:
            pad += [0, (self.stride - s % self.stride) % self.stride]
        if sum(pad) == 0:
            return x
        return nn.functional.pad(x, pad)

    def _crop(self, x: torch.Tensor, size: list[int]) -> torch.Tensor:
        if self.spatial_dims == 2:
            return x[:, :, : size[0], : size[1]]
        return x[:, :, : size[0], : size[1], : size[2]]


class AttentionUNet(UNet):
    """U-Net whose skips pass through additive attention gates (Oktay et al. 2018)."""

    use_attention = True
