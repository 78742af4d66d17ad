"""Registry of MONAI networks, built by name from params."""
from __future__ import annotations

from collections.abc import Callable

from monai.networks.nets import UNet
from torch import nn

from segpipe.errors import ConfigError


def _unet(in_channels: int, out_channels: int, channels: tuple[int, ...]) -> nn.Module:
    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
    )


ARCHS: dict[str, Callable[..., nn.Module]] = {"unet": _unet}


def build(name: str, in_channels: int, out_channels: int, channels: tuple[int, ...]) -> nn.Module:
    """A 2-D network that maps (N, in_channels, H, W) to per-class logits (N, out_channels, H, W)."""
    if name not in ARCHS:
        raise ConfigError(f"train.archs: unknown architecture {name!r}; known: {sorted(ARCHS)}")
    return ARCHS[name](in_channels, out_channels, tuple(channels))
