"""Training and validation samples read from the Zarr stores, at the model's scale.

Two ways, chosen by the dataset's `tile_scale`:
- None (small images): every labelled frame resized whole and cached in memory at the model's
  scale, the only copy of the dataset held (bounded by n_frames x image_size).
- a number (large images): random crops covering `tile_extent()` full-resolution pixels, the
  image read from Zarr per step (only the chunks a crop covers); a share of them centred on
  labelled pixels picked from a small foreground map. Per case only the intensity statistics, that
  map and the masks at tile_scale (bit-packed: 29 classes of a 2048^2 hand at 0.125 take 240 kB)
  stay in memory.
Both normalise as inference does (segpipe.preprocess: z-score over the whole frame, then resize).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import math

import numpy as np
import torch

from segpipe.config import DatasetConfig
from segpipe.errors import ConfigError
from segpipe.preprocess import frames_to_input, image_channels, image_statistics, masks_to_target, resize
from segpipe.store import CaseStore, labelled_frames, read_labelled_cases

# Edge of one foreground cell (at tile_scale) as a fraction of the crop's edge: small enough that a
# cell lies inside any crop centred in it, coarse enough that the map stays a few hundred cells.
FOREGROUND_CELLS_PER_CROP = 16


class Augment(Protocol):
    """segpipe.augment's contract: image (H, W, C) float32 in [0, 1], mask (H, W, K) uint8, stateless per seed."""

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]: ...


def load_samples(
    images: CaseStore, labels: CaseStore, case_ids: list[str], image_size: tuple[int, int], in_channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack every labelled frame of the cases: x (N, in_channels, h, w) float32, y (N, K, h, w) uint8 0/1.

    store.CASES_IN_FLIGHT cases are read at a time, so memory holds the resized dataset plus that many
    full-size cases.
    """
    xs, ys = [], []
    for frames, masks in read_labelled_cases(images, labels, case_ids):
        xs.append(resize(frames_to_input(frames, in_channels), image_size))
        ys.append(masks_to_target(masks, image_size).to(torch.uint8))
    if not xs:
        raise ConfigError(f"{images.path}: no labelled frames in cases {case_ids[:5]}...")
    return torch.cat(xs), torch.cat(ys)


class WholeFrames:
    """Labelled frames resized whole to the model's scale, cached: for small images."""

    deterministic = True  # a sample is the same every time it is drawn
    foreground_fraction = 0.0

    def __init__(self, images: CaseStore, labels: CaseStore, case_ids: list[str], data: DatasetConfig):
        self.x, self.y = load_samples(images, labels, case_ids, data.image_size, data.in_channels)

    def __len__(self) -> int:
        return len(self.x)

    def draw(self, i: int, generator: torch.Generator, foreground: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


@dataclass(frozen=True)
class TileCase:
    case_id: str
    frame: int | None  # None: a still image; else the frame of a video
    height: int  # full resolution
    width: int
    mean: float  # over the whole frame, as frames_to_input takes them
    std: float
    mask_bits: np.ndarray  # (K, h, ceil(w / 8)) the masks at tile_scale, bit-packed along rows
    scaled_width: int
    foreground: np.ndarray  # (n, 2) top-left corners, at tile_scale, of cells holding a labelled pixel
    cell: int

    def masks(self, rows: slice, cols: slice) -> np.ndarray:
        """(K, rows, cols) of the masks at tile_scale, unpacked from the cache."""
        return np.unpackbits(self.mask_bits[:, rows], axis=-1, count=self.scaled_width)[:, :, cols]


def frame_ids(images: CaseStore, labels: CaseStore, case_id: str) -> list[int | None]:
    """The labelled frames of a case as indices into its video, or [None] for a labelled still image."""
    keep = labelled_frames(labels, case_id)
    return [int(f) for f in keep] if images.is_video(case_id) else [None] * len(keep)


def _frame_index(frame: int | None) -> tuple:
    """The leading index that selects one frame of an array: nothing for a still image."""
    return () if frame is None else (frame,)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, round(height * scale)), max(1, round(width * scale))


def scaled_masks(labels: CaseStore, case_id: str, frame: int | None, scale: float) -> np.ndarray:
    """(K, h, w) uint8 masks of one frame at `scale`, resized as inference and validation see them."""
    masks = labels.array(case_id, "mask")[_frame_index(frame)]
    return masks_to_target(masks[None], scaled_size(*masks.shape[-2:], scale))[0].to(torch.uint8).numpy()


def _foreground_cells(masks: np.ndarray, cell: int) -> np.ndarray:
    """Corners of the cell x cell blocks of (K, h, w) masks holding a labelled pixel of any class."""
    height, width = masks.shape[-2:]
    rows, cols = -(-height // cell), -(-width // cell)
    padded = np.zeros((rows * cell, cols * cell), dtype=bool)
    padded[:height, :width] = masks.any(axis=0)
    return np.argwhere(padded.reshape(rows, cell, cols, cell).any(axis=(1, 3))) * cell


class TileCrops:
    """Random crops of large images: the image read from Zarr per draw, only the chunks a crop covers;
    the masks from a per-case cache at tile_scale (bit-packed), since the model only sees them there."""

    deterministic = False  # every draw is a new crop

    def __init__(
        self, images: CaseStore, labels: CaseStore, case_ids: list[str], data: DatasetConfig, foreground_fraction: float
    ):
        self.images, self.labels = images, labels
        self.size, self.in_channels, self.scale = data.image_size, data.in_channels, data.tile_scale
        self.extent = data.tile_extent()
        self.foreground_fraction = foreground_fraction
        cell = max(1, min(self.size) // FOREGROUND_CELLS_PER_CROP)
        self.cases = [self._index(c, f, cell) for c in case_ids for f in frame_ids(images, labels, c)]
        if not self.cases:
            raise ConfigError(f"{labels.path}: no labelled frames in cases {case_ids[:5]}...")

    def _index(self, case_id: str, frame: int | None, cell: int) -> TileCase:
        pixels = np.asarray(self.images.image(case_id)[_frame_index(frame)])
        try:
            mean, std = image_statistics(pixels, self.in_channels, len(pixels))
        except ValueError as exc:
            raise ConfigError(f"{self.images.path}: case {case_id!r}: {exc} (in_channels)") from None
        masks = scaled_masks(self.labels, case_id, frame, self.scale)
        return TileCase(
            case_id, frame, pixels.shape[0], pixels.shape[1], mean, std,
            np.packbits(masks, axis=-1), masks.shape[-1], _foreground_cells(masks, cell), cell,
        )

    def __len__(self) -> int:
        return len(self.cases)

    def corner(self, case: TileCase, generator: torch.Generator, foreground: bool) -> tuple[int, int]:
        """Top-left corner of a crop at tile_scale: centred on a labelled cell (when the frame has one), or anywhere."""
        h, w = self.size
        height, width = case.mask_bits.shape[1], case.scaled_width
        if foreground and len(case.foreground):
            cell = case.foreground[int(torch.randint(len(case.foreground), (), generator=generator))]
            cy, cx = (int(c) + int(torch.randint(case.cell, (), generator=generator)) for c in cell)
            r0, c0 = cy - h // 2, cx - w // 2
        else:
            r0 = int(torch.randint(max(1, height - h + 1), (), generator=generator))
            c0 = int(torch.randint(max(1, width - w + 1), (), generator=generator))
        # Inside the image where it is larger than the crop; centred (and padded) where it is smaller.
        r0 = min(max(r0, 0), height - h) if height >= h else -((h - height) // 2)
        c0 = min(max(c0, 0), width - w) if width >= w else -((w - width) // 2)
        return r0, c0

    def read(self, case: TileCase, r0: int, c0: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The crop whose corner is (r0, c0) at tile_scale: x (C, eh, ew) float32 at full resolution, read
        from Zarr and z-scored with the frame's statistics, y (K, h, w) uint8 at tile_scale; both zero
        (the image's mean) past the frame's edges."""
        eh, ew = self.extent
        y0, x0 = round(r0 / self.scale), round(c0 / self.scale)
        ys, xs = slice(max(y0, 0), min(y0 + eh, case.height)), slice(max(x0, 0), min(x0 + ew, case.width))
        pixels = self.images.image(case.case_id)[_frame_index(case.frame) + (ys, xs)]
        pixels = image_channels(np.asarray(pixels), self.in_channels)
        x = torch.zeros((self.in_channels, eh, ew))
        x[:, ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = (pixels - case.mean) / (case.std + 1e-6)

        (h, w), height = self.size, case.mask_bits.shape[1]
        rows, cols = slice(max(r0, 0), min(r0 + h, height)), slice(max(c0, 0), min(c0 + w, case.scaled_width))
        y = torch.zeros((case.mask_bits.shape[0], h, w), dtype=torch.uint8)
        y[:, rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0] = torch.from_numpy(case.masks(rows, cols))
        return x, y

    def draw(self, i: int, generator: torch.Generator, foreground: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        case = self.cases[i]
        x, y = self.read(case, *self.corner(case, generator, foreground))
        return resize(x[None], self.size)[0], y


def with_augment(x: torch.Tensor, y: torch.Tensor, augment: Augment, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a normalised sample: mapped onto [0, 1] by its own range for the augmenter, then back,
    so that without any change the sample comes back as it went in."""
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo if hi > lo else 1.0
    image = ((x - lo) / span).permute(1, 2, 0).numpy()
    image, mask = augment(image, y.permute(1, 2, 0).numpy(), seed)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() * span + lo
    return x, torch.from_numpy(np.ascontiguousarray(mask)).permute(2, 0, 1)


class TrainingSet:
    """Batches of (x, y, weight or None) from a sample source, augmented on the way.

    Every random choice comes from the caller's generator, so a run (and its resumption) is seeded.
    """

    def __init__(self, source: WholeFrames | TileCrops, augment: Augment | None = None):
        self.source, self.augment = source, augment
        # Weight maps are computed once per sample where samples repeat exactly (whole frames, no augmentation).
        self.weights: dict[int, torch.Tensor] | None = {} if source.deterministic and augment is None else None

    def __len__(self) -> int:
        return len(self.source)

    def _weights(self, i: int, y: torch.Tensor, weight_map: Callable[[np.ndarray], np.ndarray]) -> torch.Tensor:
        if self.weights is not None and i in self.weights:
            return self.weights[i]
        w = torch.from_numpy(weight_map(y.numpy()))
        if self.weights is not None:
            self.weights[i] = w
        return w

    def batch(
        self, indices: torch.Tensor, generator: torch.Generator, weight_map: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x (B, C, h, w) float32, y (B, K, h, w) float 0/1, and weight_map(mask (K, h, w) uint8) when given.

        The last ceil(B x foreground_fraction) samples are drawn around foreground (nnU-Net's oversampling),
        so every batch holds at least that share, however small the batch.
        """
        if isinstance(self.source, WholeFrames) and self.augment is None:
            # Cached frames unchanged by drawing: one gather from the stacked tensors, no per-sample work.
            x, y = self.source.x[indices], self.source.y[indices]
        else:
            x, y = self._draw(indices, generator)
        w = None
        if weight_map is not None:
            w = torch.stack([self._weights(i, mask, weight_map) for i, mask in zip(indices.tolist(), y)])
        return x, y.float(), w

    def _draw(self, indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n_foreground = math.ceil(len(indices) * self.source.foreground_fraction)
        xs, ys = [], []
        for j, i in enumerate(indices.tolist()):
            x, y = self.source.draw(i, generator, foreground=j >= len(indices) - n_foreground)
            if self.augment is not None:
                x, y = with_augment(x, y, self.augment, int(torch.randint(2**31, (), generator=generator)))
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.stack(ys)


def training_set(
    images: CaseStore,
    labels: CaseStore,
    case_ids: list[str],
    data: DatasetConfig,
    foreground_fraction: float,
    augment: Augment | None = None,
) -> TrainingSet:
    """The training samples of a dataset, whole frames or random crops as its tile_scale says."""
    if data.tile_scale is None:
        source: WholeFrames | TileCrops = WholeFrames(images, labels, case_ids, data)
    else:
        source = TileCrops(images, labels, case_ids, data, foreground_fraction)
    return TrainingSet(source, augment)


def validation_batches(
    images: CaseStore, labels: CaseStore, case_ids: list[str], data: DatasetConfig, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validation (x, y) batches as inference sees them: whole frames at image_size, or, with tile_scale,
    each whole frame at that scale (one per batch, sizes differ), for a sliding window of image_size."""
    if data.tile_scale is None:
        x, y = load_samples(images, labels, case_ids, data.image_size, data.in_channels)
        return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    batches = []
    for case_id in case_ids:
        for frame in frame_ids(images, labels, case_id):
            pixels = np.asarray(images.image(case_id)[_frame_index(frame)])[None]
            x = resize(frames_to_input(pixels, data.in_channels), scaled_size(*pixels.shape[1:3], data.tile_scale))
            batches.append((x, torch.from_numpy(scaled_masks(labels, case_id, frame, data.tile_scale))[None]))
    if not batches:
        raise ConfigError(f"{labels.path}: no labelled frames in cases {case_ids[:5]}...")
    return batches
