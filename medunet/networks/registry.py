"""One registry for every network: ``create_network(cfg)``, ``describe_network(cfg)``, ``list_networks()``.

A registered network is a module class built from a ``NetworkConfig`` that also describes itself for
a config (``describe(cfg) -> NetworkDescription``, see ``medunet.networks.description``).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from torch import nn

from medunet.config import NetworkConfig
from medunet.networks.description import EnsembleDescription, NetworkDescription
from medunet.networks.ensemble import FoldEnsemble
from medunet.networks.unet import AttentionUNet, UNet


class Network(Protocol):
    def __call__(self, cfg: NetworkConfig) -> nn.Module: ...

    def describe(self, cfg: NetworkConfig) -> NetworkDescription: ...


_REGISTRY: dict[str, Network] = {
    "unet": UNet,
    "attention_unet": AttentionUNet,
}


def list_networks() -> list[str]:
    """Names accepted by ``create_network``."""
    return sorted(_REGISTRY)


def _registered(cfg: NetworkConfig) -> Network:
    try:
        return _REGISTRY[cfg.name]
    except KeyError:
        raise ValueError(f"unknown network {cfg.name!r}; choose one of: {', '.join(list_networks())}") from None


def create_network(cfg: NetworkConfig) -> nn.Module:
    """Build the network named ``cfg.name``; an unknown name lists the valid ones.

    With ``cfg.ensemble > 1``, that many copies averaged (``FoldEnsemble``), for inference.
    """
    network = _registered(cfg)
    if cfg.ensemble > 1:
        member = dataclasses.replace(cfg, ensemble=1)  # in eval mode a deep-supervised member gives its main output
        return FoldEnsemble(cfg, [network(member) for _ in range(cfg.ensemble)])
    return network(cfg)


def describe_network(cfg: NetworkConfig) -> NetworkDescription:
    """What the network ``cfg`` builds says about itself: stride, receptive field, costs."""
    network = _registered(cfg)
    if cfg.ensemble > 1:
        member = network.describe(dataclasses.replace(cfg, ensemble=1))
        return EnsembleDescription(member, cfg.ensemble, cfg.out_channels)
    return network.describe(cfg)
