"""Registry of MONAI networks, built by name from params.

Every network maps (N, in_channels, H, W) to per-class logits (N, out_channels, H, W); widths
derive from `train.channels` (c0, c1, ...). H and W must be multiples of the size below, and at
least twice it to train (instance norm needs more than one pixel at the deepest level):

- unet: MONAI UNet, one stride-2 level per entry of channels, `res_units`
  residual units a level (instance norm).                                 multiple of 2**(len-1)
- unetpp: BasicUNetPlusPlus, fixed 5 levels: channels doubled out to 5,
  last upsampling at c0; the final (not deep-supervision) output.        multiple of 16
- attention_unet: AttentionUnet, one level per entry of channels.         multiple of 2**(len-1)
- segresnet: SegResNet, init_filters c0 doubling over len(channels) levels. multiple of 2**(len-1)
- swin_unetr: SwinUNETR, feature_size c0 rounded up to a multiple of 12.  multiple of 32
- dynunet: DynUNet, nnU-Net's network: two 3x3 convolutions a level (instance norm,
  leaky ReLU), one level per entry of channels, trained with deep supervision
  (the output of every level above the bottleneck: the final one and len-2 deeper).
                                                                          multiple of 2**(len-1)
- flexible_unet: FlexibleUNet, EfficientNet encoder (`encoder`, random init unless
  `encoder_weights` names a local file), decoder channels doubled out to 5, reversed. multiple of 32
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.networks.nets import AttentionUnet, BasicUNetPlusPlus, DynUNet, FlexibleUNet, SegResNet, SwinUNETR, UNet
from torch import nn

from segpipe.errors import ConfigError


def widths(channels: tuple[int, ...], n: int) -> tuple[int, ...]:
    """`channels` cut or extended (doubling the last) to exactly n levels."""
    out = list(channels[:n])
    while len(out) < n:
        out.append(out[-1] * 2)
    return tuple(out)


# Released EfficientNet weights (efficientnet-pytorch's files, what MONAI would download) number the
# blocks globally (_blocks.7.x); MONAI nests them per stage (_blocks.2.7.x).
_RELEASED_BLOCK_KEY = re.compile(r"(.+)\.\d+(\.\d+\..+)")


def load_encoder_weights(encoder: nn.Module, path: Path) -> None:
    """Copy backbone weights from a local state-dict file, in MONAI's key layout or the released
    one. A 3-channel (RGB) stem is summed over colours when the network takes 1 channel."""
    if not path.is_file():
        raise ConfigError(f"{path}: train.encoder_weights: no such file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise ConfigError(f"{path}: train.encoder_weights: not a PyTorch weights file ({exc})") from exc
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: train.encoder_weights: expected a state dict, got {type(saved).__name__}")
    state, missing, mismatched = encoder.state_dict(), [], []
    for key, value in state.items():
        source = saved.get(key, saved.get(_RELEASED_BLOCK_KEY.sub(r"\1\2", key)))
        if source is None:
            if not key.endswith("num_batches_tracked"):  # older files lack these counters
                missing.append(key)
            continue
        if key == "_conv_stem.weight" and value.shape[1] == 1 and source.shape[1] == 3:
            source = source.sum(1, keepdim=True)
        if source.shape != value.shape:
            mismatched.append(f"{key} {tuple(source.shape)} vs {tuple(value.shape)}")
        else:
            state[key] = source
    if missing or mismatched:
        raise ConfigError(
            f"{path}: train.encoder_weights: not weights of this {type(encoder).__name__}: {len(missing)} "
            f"missing (e.g. {missing[:3]}), {len(mismatched)} of another shape (e.g. {mismatched[:3]})"
        )
    encoder.load_state_dict(state)


class FinalOutput(nn.Module):
    """BasicUNetPlusPlus returns a list (deep-supervision heads, then the final output): keep the last."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]


def _unet(
    in_channels: int, out_channels: int, channels: tuple[int, ...], res_units: int = 1, **_
) -> nn.Module:
    strides = (2,) * (len(channels) - 1)
    return UNet(2, in_channels, out_channels, channels=channels, strides=strides, num_res_units=res_units)


def _unetpp(in_channels: int, out_channels: int, channels: tuple[int, ...], **_) -> nn.Module:
    features = (*widths(channels, 5), channels[0])
    return FinalOutput(BasicUNetPlusPlus(2, in_channels, out_channels, features=features))


def _attention_unet(in_channels: int, out_channels: int, channels: tuple[int, ...], **_) -> nn.Module:
    strides = (2,) * (len(channels) - 1)
    return AttentionUnet(2, in_channels, out_channels, channels=channels, strides=strides)


def _dynunet(in_channels: int, out_channels: int, channels: tuple[int, ...], **_) -> nn.Module:
    # In training it returns every supervised output, upsampled, stacked on dim 1 (losses.output_loss);
    # in eval mode the final output alone.
    strides = (1,) + (2,) * (len(channels) - 1)
    return DynUNet(2, in_channels, out_channels, kernel_size=(3,) * len(channels), strides=strides,
                   upsample_kernel_size=strides[1:], filters=channels, deep_supervision=True,
                   deep_supr_num=max(1, len(channels) - 2))


def _segresnet(in_channels: int, out_channels: int, channels: tuple[int, ...], **_) -> nn.Module:
    levels = len(channels)
    return SegResNet(
        spatial_dims=2, in_channels=in_channels, out_channels=out_channels, init_filters=channels[0],
        num_groups=math.gcd(8, channels[0]),  # group norm needs groups that divide the width
        blocks_down=(1,) + (2,) * (levels - 2) + (4,),  # MONAI's default (1, 2, 2, 4) at 4 levels
        blocks_up=(1,) * (levels - 1),
    )


def _swin_unetr(in_channels: int, out_channels: int, channels: tuple[int, ...], **_) -> nn.Module:
    feature_size = 12 * math.ceil(channels[0] / 12)  # MONAI requires a multiple of 12
    return SwinUNETR(in_channels, out_channels, feature_size=feature_size, spatial_dims=2)


def _flexible_unet(
    in_channels: int, out_channels: int, channels: tuple[int, ...],
    encoder: str = "efficientnet-b0", encoder_weights: Path | None = None, **_,
) -> nn.Module:
    decoder = widths(channels, 5)[::-1]
    try:
        net = FlexibleUNet(in_channels, out_channels, backbone=encoder, pretrained=False, decoder_channels=decoder)
    except (KeyError, ValueError) as exc:  # MONAI rejects an unknown backbone name
        raise ConfigError(f"train.encoder: {exc}") from exc
    if encoder_weights is not None:
        load_encoder_weights(net.encoder, Path(encoder_weights))
    return net


@dataclass(frozen=True)
class Arch:
    make: Callable[..., nn.Module]
    size_multiple: Callable[[tuple[int, ...]], int]  # of the input H and W, given train.channels


def _per_level(channels: tuple[int, ...]) -> int:
    return 2 ** (len(channels) - 1)


ARCHS: dict[str, Arch] = {
    "unet": Arch(_unet, _per_level),
    "unetpp": Arch(_unetpp, lambda c: 16),
    "attention_unet": Arch(_attention_unet, _per_level),
    "dynunet": Arch(_dynunet, _per_level),
    "segresnet": Arch(_segresnet, _per_level),
    "swin_unetr": Arch(_swin_unetr, lambda c: 32),
    "flexible_unet": Arch(_flexible_unet, lambda c: 32),
}


def _arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ConfigError(f"train.archs: unknown architecture {name!r}; known: {sorted(ARCHS)}")
    return ARCHS[name]


def build(
    name: str, in_channels: int, out_channels: int, channels: tuple[int, ...],
    encoder: str = "efficientnet-b0", encoder_weights: Path | None = None, res_units: int = 1,
) -> nn.Module:
    """A 2-D network that maps (N, in_channels, H, W) to per-class logits (N, out_channels, H, W).

    `res_units` matters to unet only, `encoder` and `encoder_weights` to flexible_unet only; pass the
    weights when a training run starts, not when rebuilding a trained checkpoint (its state dict
    holds them already)."""
    channels = tuple(channels)
    if len(channels) < 2:
        raise ConfigError(f"train.channels: need at least 2 levels, got {list(channels)}")
    return _arch(name).make(
        in_channels, out_channels, channels, encoder=encoder, encoder_weights=encoder_weights, res_units=res_units
    )


def check_input_size(name: str, channels: tuple[int, ...], size: tuple[int, int]) -> None:
    """ConfigError unless a (H, W) input suits the architecture (see the module doc)."""
    multiple = _arch(name).size_multiple(tuple(channels))
    if any(s % multiple or s < 2 * multiple for s in size):
        raise ConfigError(
            f"image_size {list(size)}: {name} needs H and W multiples of {multiple}, at least {2 * multiple}"
        )
