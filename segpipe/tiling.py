"""Sliding-window geometry and blending: where tiles go, how they are weighted, and a band
accumulator that hands back finished rows so no full-resolution float array is ever held.

Tile placement is MONAI's (`monai.inferers.utils._get_scan_interval` + `monai.data.utils.dense_patch_slices`):
start at 0, step int(tile * (1 - overlap)), last tile flush with the far edge. Matching it lets
inference be checked against `sliding_window_inference` exactly. Weights come from MONAI's own
`compute_importance_map` (gaussian sigma = tile / 8, or constant).

Portable: imports nothing of segpipe, so an exported bundle runs it too (segpipe.export).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from monai.data.utils import compute_importance_map

SIGMA_SCALE = 0.125


def window_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Tile starts along one axis of `length` >= `tile` pixels, placed as MONAI places them."""
    if length < tile:
        raise ValueError(f"axis of {length} px is shorter than the {tile} px tile: pad it first")
    step = tile if tile == length else max(int(tile * (1 - overlap)), 1)
    count = next(d for d in range(length) if d * step + tile >= length) + 1
    return [min(d * step, length - tile) for d in range(count)]


def padding(length: int, tile: int) -> tuple[int, int]:
    """(before, after) padding that brings an axis shorter than a tile up to it, split as MONAI does."""
    missing = max(tile - length, 0)
    return missing // 2, missing - missing // 2


def importance_map(tile: tuple[int, int], mode: str) -> torch.Tensor:
    """(h, w) float32 blending weights of one tile."""
    return compute_importance_map(tile, mode=mode, sigma_scale=SIGMA_SCALE, device="cpu", dtype=torch.float32)


def row_bands(height: int, chunk: int, band_rows: int) -> list[tuple[int, int]]:
    """Split rows [0, height) into bands of whole chunk rows, about `band_rows` each: units of work
    whose writes never share a chunk (nor, with one shard per chunk row, a shard)."""
    step = max(chunk, band_rows // chunk * chunk)
    return [(r, min(r + step, height)) for r in range(0, height, step)]


@dataclass(frozen=True)
class Grid:
    """Where the tiles of one image go, in the coordinates of the image padded up to one tile."""

    shape: tuple[int, int]  # the image (H, W)
    tile: tuple[int, int]  # full-resolution extent of one tile
    pad: tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))
    ys: list[int]
    xs: list[int]

    @classmethod
    def of(cls, shape: tuple[int, int], tile: tuple[int, int], overlap: float) -> Grid:
        pad = (padding(shape[0], tile[0]), padding(shape[1], tile[1]))
        padded = [s + sum(p) for s, p in zip(shape, pad)]
        return cls(tuple(shape), tuple(tile), pad,
                   window_starts(padded[0], tile[0], overlap), window_starts(padded[1], tile[1], overlap))

    @property
    def padded_width(self) -> int:
        return self.shape[1] + sum(self.pad[1])

    def tile_rows_for(self, rows: tuple[int, int]) -> list[int]:
        """Starts (padded) of the tile rows that touch image rows [r0, r1)."""
        lo, hi = rows[0] + self.pad[0][0], rows[1] + self.pad[0][0]
        return [y for y in self.ys if y < hi and y + self.tile[0] > lo]


class BandBlender:
    """Weighted sum of tile logits over a band of rows, tiles added in raster order.

    Rows above the current tile row are final; they are normalised, passed to `emit(r0, r1, logits)`
    (image rows, padding cropped; a view into the buffer, valid during the call) in runs that end on
    a `chunk` boundary, and dropped. The buffer is allocated once, one tile plus one chunk of rows
    (what can be pending at once), whatever the image height.
    """

    def __init__(self, grid: Grid, rows: tuple[int, int], classes: int, weight: torch.Tensor, chunk: int,
                 emit: Callable[[int, int, torch.Tensor], None]):
        self.grid, self.rows, self.chunk, self.emit = grid, rows, chunk, emit
        self.weight = weight
        self.top = grid.pad[0][0]  # padded row of image row 0
        self.base = rows[0] + self.top  # padded row of the buffer's first row
        self.done = rows[0]  # next image row to emit
        capacity = grid.tile[0] + chunk
        self.acc = torch.zeros(classes, capacity, grid.padded_width)
        self.wsum = torch.zeros(1, capacity, grid.padded_width)

    def add(self, y: int, x: int, logits: torch.Tensor) -> None:
        """Blend one tile's (K, h, w) logits in at padded position (y, x)."""
        self._finish_above(y)
        h, w = self.grid.tile
        lo = max(y, self.base)  # a tile may start above this band's first row
        rows = slice(lo - self.base, y + h - self.base)
        self.acc[:, rows, x : x + w].addcmul_(logits[:, lo - y :], self.weight[lo - y :])
        self.wsum[:, rows, x : x + w] += self.weight[lo - y :]

    def close(self) -> None:
        self._finish_above(math.inf)

    def _finish_above(self, y: float) -> None:
        final = min(y - self.top, self.rows[1])  # image rows < final are complete
        end = final if final == self.rows[1] else final // self.chunk * self.chunk
        if end <= self.done:
            return
        n = end + self.top - self.base
        left, right = self.grid.pad[1][0], self.grid.pad[1][0] + self.grid.shape[1]
        # Normalised in place: these rows are dropped next, and a band of a wide image is large.
        self.emit(self.done, end, self.acc[:, :n, left:right].div_(self.wsum[:, :n, left:right]))
        for buffer in (self.acc, self.wsum):  # the pending rows move to the top, the rest is cleared
            kept = buffer.shape[1] - n
            buffer[:, :kept] = buffer[:, n:].clone()
            buffer[:, kept:] = 0
        self.base, self.done = end + self.top, end


def even_tile(size: int, chunk: int) -> int:
    """The tile side that splits `size` into as few tiles of at most `chunk` as possible, evenly: how
    segpipe.store chunks an image (its even_tile), so the rows that inference reads at a time and
    the bands it works in, which a bundle must match, follow from the image's size alone."""
    return -(-size // -(-size // chunk))
