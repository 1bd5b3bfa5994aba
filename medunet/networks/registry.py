"""One registry for every network: ``create_network(cfg)`` and ``list_networks()``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from medunet.config import NetworkConfig
from medunet.networks.unet import AttentionUNet, UNet

_REGISTRY: dict[str, Callable[[NetworkConfig], nn.Module]] = {
    "unet": UNet,
    "attention_unet": AttentionUNet,
}


def list_networks() -> list[str]:
    """Names accepted by ``create_network``."""
    return sorted(_REGISTRY)


def create_network(cfg: NetworkConfig) -> nn.Module:
    """Build the network named ``cfg.name``; an unknown name lists the valid ones.

    With ``cfg.ensemble > 1``, that many copies averaged (``FoldEnsemble``), for inference.
    """
    if cfg.ensemble > 1:
        from medunet.networks.ensemble import FoldEnsemble

        if cfg.name not in _REGISTRY:
            raise ValueError(f"unknown network {cfg.name!r}; choose one of: {', '.join(list_networks())}")
        return FoldEnsemble(cfg)
    try:
        factory = _REGISTRY[cfg.name]
    except KeyError:
        raise ValueError(f"unknown network {cfg.name!r}; choose one of: {', '.join(list_networks())}") from None
    return factory(cfg)
