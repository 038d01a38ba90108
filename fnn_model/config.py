"""Network configuration: dataclasses whose defaults are the released MICrONS network (spec section 3)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FeedforwardConfig:
    """Dense feedforward core ("InputDense"): three blocks of two temporal 3x3 convs each.

    Every block has `channels[b] // groups[b]` channels per group; each block's output is `3 * channels[b]`.
    """

    input_kernel: int = 6
    input_stride: int = 2
    channels: tuple[int, ...] = (32, 64, 128)
    groups: tuple[int, ...] = (1, 2, 4)
    temporal: tuple[int, ...] = (3, 3, 3)
    spatial: tuple[int, ...] = (3, 3, 3)
    pools: tuple[int, ...] = (2, 2, 1)
    out_channels: int = 128

    def __post_init__(self) -> None:
        sizes = {len(self.channels), len(self.groups), len(self.temporal), len(self.spatial), len(self.pools)}
        if len(sizes) != 1:
            raise ValueError(f"FeedforwardConfig: per-block tuples differ in length: {self}")
        for c, g in zip(self.channels, self.groups):
            if c % g:
                raise ValueError(f"FeedforwardConfig: channels {c} not divisible by groups {g}")


@dataclass(frozen=True)
class RecurrentConfig:
    """Recurrent core ("CvtLstm"): a convolutional-attention LSTM over `groups` channel groups per stream."""

    in_channels: int = 256
    hidden_channels: int = 256
    common_channels: int = 512
    out_channels: int = 128
    groups: int = 8
    spatial: int = 3

    def __post_init__(self) -> None:
        for name in ("in_channels", "hidden_channels", "common_channels"):
            if getattr(self, name) % self.groups:
                raise ValueError(f"RecurrentConfig: {name} not divisible by groups {self.groups}")


@dataclass(frozen=True)
class PerspectiveConfig:
    """Eye-position MLP, monitor plane and retina ("MlpMonitorRetina")."""

    mlp_features: int = 16
    mlp_layers: int = 3
    retina_height: int = 128
    retina_width: int = 192
    retina_degrees: float = 75.0


@dataclass(frozen=True)
class ModulationConfig:
    """Behaviour MLP followed by an LSTM ("MlpLstm")."""

    mlp_features: int = 16
    lstm_features: int = 16


@dataclass(frozen=True)
class NetworkConfig:
    """Whole network except the number of units, which is per scan. The default is the MICrONS release."""

    feedforward: FeedforwardConfig = field(default_factory=FeedforwardConfig)
    recurrent: RecurrentConfig = field(default_factory=RecurrentConfig)
    perspective: PerspectiveConfig = field(default_factory=PerspectiveConfig)
    modulation: ModulationConfig = field(default_factory=ModulationConfig)
    streams: int = 4
    stimuli: int = 1
    perspectives: int = 2
    modulations: int = 2

    @classmethod
    def microns(cls) -> NetworkConfig:
        """The released MICrONS network (same as `NetworkConfig()`)."""
        return cls()

    @classmethod
    def tiny(cls) -> NetworkConfig:
        """A small network of the same structure, for fast tests and dry runs (~1% of the MICrONS cost)."""
        return cls(
            feedforward=FeedforwardConfig(channels=(8, 16, 32), groups=(1, 2, 4), out_channels=16),
            recurrent=RecurrentConfig(
                in_channels=32, hidden_channels=32, common_channels=64, out_channels=16, groups=4
            ),
            perspective=PerspectiveConfig(mlp_features=8, retina_height=32, retina_width=48),
            modulation=ModulationConfig(mlp_features=8, lstm_features=8),
            streams=2,
        )
