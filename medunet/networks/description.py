"""What a network tells planners about itself.

Tile planning (``medunet.inference.tiling``) and the self-configuring planner (``medunet.planning``)
know a network only through its ``NetworkDescription``, which every registered network gives for a
config (``medunet.networks.registry.describe_network``). Neither reads network names, norm names or
layer counts: a new network is planned for correctly once it describes itself, and the contract
tests (``tests/networks/test_contract.py``) hold each description to a measured forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class NetworkDescription(Protocol):
    @property
    def spatial_dims(self) -> int: ...

    @property
    def stride(self) -> tuple[int, ...]:
        """Per axis, the total downsampling: an input side that is a multiple of it is not padded."""
        ...

    @property
    def receptive_field(self) -> tuple[int, ...]:
        """Per axis, the theoretical receptive field in voxels."""
        ...

    @property
    def window_statistics(self) -> bool:
        """The output depends on statistics of the whole window (instance or group norm): a window
        is a different input, not a crop of one pass, so fewer and larger windows count for more
        than wide overlaps."""
        ...

    @property
    def slab_forward(self) -> bool:
        """At inference (eval mode, no gradients) the PyTorch module runs its full-resolution level
        in slabs, so a window costs ``activation_bytes_per_voxel(slab_forward=True)``."""
        ...

    @property
    def widest_map_channels(self) -> int:
        """Channels of the widest map at full resolution: with the window's voxels, the largest
        tensor a forward allocates (a GPU kernel indexes at most 2^31 elements of one)."""
        ...

    def activation_bytes_per_voxel(self, half_precision: bool = False, slab_forward: bool = True) -> float:
        """Bytes one window voxel costs in a forward pass without gradients, beyond a fixed overhead
        (``medunet.inference.tiling.WINDOW_OVERHEAD``). ``slab_forward`` False: the engine runs the
        plain forward (an exported graph, TorchScript) even where the module has a slab forward."""
        ...

    def flops(self, window: Sequence[int]) -> float:
        """Floating-point operations (2 per multiply-add) of one forward pass over ``window``."""
        ...


@dataclass(frozen=True)
class EnsembleDescription:
    """``copies`` trained members averaged (``FoldEnsemble``): each member runs the window in turn,
    with the members' running sum of probabilities and one member's output alive beside it."""

    member: NetworkDescription
    copies: int
    out_channels: int

    @property
    def spatial_dims(self) -> int:
        return self.member.spatial_dims

    @property
    def stride(self) -> tuple[int, ...]:
        return self.member.stride

    @property
    def receptive_field(self) -> tuple[int, ...]:
        return self.member.receptive_field

    @property
    def window_statistics(self) -> bool:
        return self.member.window_statistics

    @property
    def slab_forward(self) -> bool:
        return self.member.slab_forward

    @property
    def widest_map_channels(self) -> int:
        return self.member.widest_map_channels

    def activation_bytes_per_voxel(self, half_precision: bool = False, slab_forward: bool = True) -> float:
        value_bytes = 2 if half_precision else 4
        running = 4 * self.out_channels * value_bytes  # the sum and one member's output, with their softmax copies
        return self.member.activation_bytes_per_voxel(half_precision, slab_forward) + running

    def flops(self, window: Sequence[int]) -> float:
        return self.copies * self.member.flops(window)
