"""Networks written in medunet, behind one registry."""

from medunet.networks.registry import create_network, list_networks
from medunet.networks.unet import AttentionUNet, UNet

__all__ = ["AttentionUNet", "UNet", "create_network", "list_networks"]
