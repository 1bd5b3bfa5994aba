"""Networks written in medunet, behind one registry."""

from medunet.networks.description import NetworkDescription
from medunet.networks.registry import create_network, describe_network, list_networks
from medunet.networks.unet import AttentionUNet, UNet

__all__ = ["AttentionUNet", "NetworkDescription", "UNet", "create_network", "describe_network", "list_networks"]
