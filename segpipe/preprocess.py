"""From stored frames to model tensors and back: the one place that decides intensity
normalisation and resizing, shared by training and inference so both see the same input.

Portable: imports nothing of segpipe, so an exported bundle runs it too (segpipe.export)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def frames_to_input(frames: np.ndarray, in_channels: int) -> torch.Tensor:
    """(T, H, W) or (T, H, W, C) integer frames -> (T, in_channels, H, W) float32, z-scored per frame.

    Per-frame z-scoring makes MRI warm-up brightness and X-ray exposure differences irrelevant.
    """
    x = match_channels(torch.from_numpy(np.ascontiguousarray(frames)).float(), in_channels)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / (std + 1e-6)


def match_channels(x: torch.Tensor, in_channels: int) -> torch.Tensor:
    """(T, H, W) or (T, H, W, C) frames -> (T, in_channels, H, W): grey repeated for RGB models,
    RGB averaged for grey ones."""
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x[:, None]
    if x.shape[1] == in_channels:
        return x
    if in_channels == 1:
        return x.mean(dim=1, keepdim=True)
    if x.shape[1] == 1:
        return x.expand(-1, in_channels, -1, -1)
    raise ValueError(f"cannot turn {x.shape[1]} image channels into {in_channels}")


def image_channels(pixels: np.ndarray, in_channels: int) -> torch.Tensor:
    """(h, w[, C]) integer pixels of one image -> (in_channels, h, w) float32, channels matched as
    frames_to_input matches them."""
    return match_channels(torch.from_numpy(np.ascontiguousarray(pixels)).float()[None], in_channels)[0]


def image_statistics(image: Any, in_channels: int, rows: int) -> tuple[float, float]:
    """Mean and (unbiased) std of a whole (H, W[, C]) image (numpy or Zarr) as the model sees it: the
    statistics frames_to_input z-scores a frame with, read `rows` rows at a time so that an image
    larger than memory never is read whole. In float64, so a 2048^2 sum loses nothing."""
    total = squares = count = 0.0
    for r in range(0, image.shape[0], rows):
        x = image_channels(image[r : r + rows], in_channels).double()
        total += x.sum().item()
        squares += x.square().sum().item()
        count += x.numel()
    mean = total / count
    return mean, max(squares - count * mean * mean, 0.0) ** 0.5 / max(count - 1, 1) ** 0.5


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W), antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


def masks_to_target(masks: np.ndarray, size: tuple[int, int], channels_per_step: int = 8) -> torch.Tensor:
    """(T, K, H, W) binary masks -> (T, K, h, w) float 0/1 at the model's scale.

    Resized a few channels at a time: 29 full-resolution float channels would cost ~0.5 GB.
    """
    out = []
    for start in range(0, masks.shape[1], channels_per_step):
        part = torch.from_numpy(np.ascontiguousarray(masks[:, start : start + channels_per_step])).float()
        out.append((resize(part, size) > 0.5).float())
    return torch.cat(out, dim=1)


def to_float16(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """Cast to float16 through torch: numpy's own cast is ~20x slower (43 s of a 60 s hand-X-ray inference)."""
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    return tensor.to(torch.float16).numpy()


def to_float32(array: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32).numpy()
