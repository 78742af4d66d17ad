"""Inference's arithmetic: a model, pixels in, float16 per-class sigmoid probabilities out.

Portable: this module imports nothing of segpipe but its portable siblings (segpipe.preprocess,
segpipe.tiling), relatively, and segpipe.export copies them into an exported bundle, so that the
bundle computes what the infer stage computes, op for op. (Probabilities are rounded to 1/1024,
so any other order of float operations would move some of them by a step.) segpipe.infer adds
the stores, the jobs and the Dask workers around it.

Two modes, chosen by the checkpoint's meta (`tile_scale`, see DatasetConfig):
    whole-image  each frame is resized to the model's size, predicted, and the probabilities resized
                 back to the frame's size (small images, videos frame by frame).
    tiled        a sliding window over the full-resolution image, read band by band: each tile
                 covers `extent` pixels, is resized to the model's size (not at scale 1), and its
                 logits are resized back and blended (segpipe.tiling). Finished rows are handed on
                 in whole chunk rows; no full-resolution float array is held.

Both modes normalise with whole-image statistics (per-frame z-score, as training does), so a
tile looks the same to the model whichever mode or band it is predicted in.

Test-time flips average the *logits* of the plain and flipped views, before the sigmoid: the
same space in which tiles are blended, so one rule holds throughout.

Padding: tiles are placed inside the image (MONAI's placement, segpipe.tiling), so only an axis
shorter than one tile needs any. It is mirror-padded (numpy 'reflect', the U-Net overlap-tile
strategy: the model sees plausible context, not a black frame), split before/after as MONAI
splits its padding. MONAI pads with zeros by default; with `padding_mode="reflect"` it gives
the same result as here (tests/test_infer.py checks both placements against it).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .preprocess import frames_to_input, image_channels, image_statistics, resize, to_float16
from .tiling import BandBlender, Grid, importance_map

PROB_STEPS = 1024


class Array(Protocol):
    """What inference needs of an image or output array: a numpy array or a Zarr array."""

    shape: tuple[int, ...]

    def __getitem__(self, key: Any) -> np.ndarray: ...
    def __setitem__(self, key: Any, value: np.ndarray) -> None: ...


class Settings(Protocol):
    """What inference takes of its settings (segpipe.config.InferConfig; a bundle's own copy)."""

    batch_size: int
    overlap: float
    mode: str

    def tta_flips(self) -> list[tuple[int, ...]]: ...


def to_probabilities(logits: torch.Tensor) -> np.ndarray:
    """Sigmoid, rounded to 1/1024 (within float16's own step near 1): the many exact 0s and 1s
    then compress ~10x, where float16 noise in the low bits did not compress at all.

    One full-size temporary (the sigmoid), the rest in place: `logits` may be a view the model
    returned (an expanded tensor cannot be written in place), so it is never overwritten."""
    return to_float16(logits.sigmoid().mul_(PROB_STEPS).round_().div_(PROB_STEPS))


def tta_logits(model: nn.Module, x: torch.Tensor, flips: list[tuple[int, ...]]) -> torch.Tensor:
    """Mean logits of the plain view and each flipped view (flipped back)."""
    total = model(x)
    for dims in flips:
        total = total + model(x.flip(dims)).flip(dims)  # not in place: a model may return a view
    return total / (1 + len(flips)) if flips else total


@torch.inference_mode()
def predict_frames(
    model: nn.Module,
    frames: np.ndarray,
    meta: dict[str, Any],
    cfg: Settings,
    device: torch.device,
    channels_per_step: int = 8,
) -> np.ndarray:
    """Whole-image mode: (T, H, W[, C]) frames -> (T, K, H, W) float16 probabilities at the frames' size."""
    size = tuple(meta["image_size"])
    out = np.empty((len(frames), len(meta["classes"])) + frames.shape[1:3], dtype=np.float16)
    for start in range(0, len(frames), cfg.batch_size):
        x = resize(frames_to_input(frames[start : start + cfg.batch_size], meta["in_channels"]), size)
        logits = tta_logits(model, x.to(device), cfg.tta_flips()).cpu()
        # Back to full size a few classes at a time: 29 float32 channels at 2048^2 would be ~0.5 GB.
        for c in range(0, logits.shape[1], channels_per_step):
            full = resize(logits[:, c : c + channels_per_step], frames.shape[1:3])
            out[start : start + len(x), c : c + channels_per_step] = to_probabilities(full)
    return out


def _padded_band(image: Array, grid: Grid, y: int) -> np.ndarray:
    """Image rows of the tile row starting at padded row `y`, mirror-padded where the image is smaller than a tile."""
    (top, bottom), (left, right) = grid.pad
    band = image[max(y - top, 0) : y - top + grid.tile[0]]
    if top or bottom or left or right:
        widths = ((top, bottom), (left, right)) + ((0, 0),) * (band.ndim - 2)
        band = np.pad(band, widths, mode="reflect")
    return band


def _tiles(image: Array, grid: Grid, rows: tuple[int, int], in_channels: int, stats: tuple[float, float]
           ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(y, x, (C, h, w) normalised tile) in raster order, one band of image rows read per tile row."""
    mean, std = stats
    for y in grid.tile_rows_for(rows):
        band = (image_channels(_padded_band(image, grid, y), in_channels) - mean) / (std + 1e-6)
        for x in grid.xs:
            yield y, x, band[:, :, x : x + grid.tile[1]]


def _batches(tiles: Iterator, size: int) -> Iterator[list]:
    batch = []
    for tile in tiles:
        batch.append(tile)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
def predict_tiled(
    model: nn.Module,
    meta: dict[str, Any],
    extent: tuple[int, int],
    image: Array,
    write: Callable[[int, int, np.ndarray], None],
    cfg: Settings,
    device: torch.device,
    rows: tuple[int, int] | None = None,
    chunk: int = 512,
) -> None:
    """Tiled mode: probabilities of image rows [r0, r1) (default: all) of an (H, W[, C]) image, each
    tile covering `extent` (h, w) image pixels, handed to `write(r0, r1, probs)` as (K, r1 - r0, W)
    float16 in runs of whole `chunk` rows. The image statistics are read `chunk` rows at a time."""
    size = tuple(meta["image_size"])
    grid = Grid.of(image.shape[:2], extent, cfg.overlap)
    rows = rows or (0, image.shape[0])
    stats = image_statistics(image, meta["in_channels"], chunk)

    def emit(r0: int, r1: int, logits: torch.Tensor) -> None:
        write(r0, r1, to_probabilities(logits))

    blender = BandBlender(grid, rows, len(meta["classes"]), importance_map(extent, cfg.mode), chunk, emit)
    for batch in _batches(_tiles(image, grid, rows, meta["in_channels"], stats), cfg.batch_size):
        x = resize(torch.stack([tile for _, _, tile in batch]), size)
        logits = tta_logits(model, x.to(device), cfg.tta_flips()).cpu()
        for (y, x0, _), tile_logits in zip(batch, logits):
            # Back to full resolution one tile at a time: a batch of 29-class tiles would be large.
            blender.add(y, x0, resize(tile_logits[None], extent)[0])
    blender.close()
