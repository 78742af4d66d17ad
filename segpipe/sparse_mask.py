"""A multi-label mask held as the patches that were filled into it, made dense only where read.

Why: a 2048x2048 hand X-ray's 29-channel mask is 121 MB dense while its bones cover a few percent
of it. Ingest writes it chunk by chunk (segpipe.zarr_files), and cutting each chunk out of the
dense mask copied all 121 MB; built from the patches instead, 10 demo hands took 370-400 ms to
ingest on 2 Dask workers instead of 455-490 ms, and 205-215 ms to decode instead of 220-235
(same runs, alternating). A worker holds the patches of a case, not 121 MB. The patches also
tell which chunks hold a 1 (chunks_with_ones) without looking at the others: masks are stored one
class per tile, and only those chunks are built and written.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class SparseMask:
    """A (C, H, W) uint8 mask of 0 and 1: 1 wherever an `add`ed patch is set (patches are ORed, so
    where they overlap it stays 1).

    Reading it is numpy's: `mask[c0:c1, r0:r1, x0:x1]` (slices, step 1, clipped to the shape as
    numpy clips them) is a new dense uint8 array of that region, `np.asarray(mask)` the whole mask.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = tuple(shape)
        self._patches: list[list[tuple[slice, slice, np.ndarray]]] = [[] for _ in range(self.shape[0])]  # by channel

    def add(self, channel: int, rows: slice, cols: slice, patch: np.ndarray) -> None:
        """OR `patch` (bool) into `channel` over `rows` x `cols` (explicit step-1 bounds within the shape)."""
        n_channels, height, width = self.shape
        fits = (0 <= channel < n_channels and 0 <= rows.start <= rows.stop <= height
                and 0 <= cols.start <= cols.stop <= width
                and patch.shape == (rows.stop - rows.start, cols.stop - cols.start))
        if not fits or rows.step not in (None, 1) or cols.step not in (None, 1):
            raise ValueError(f"patch {patch.shape} at channel {channel}, rows {rows}, cols {cols} "
                             f"does not fit a mask of shape {self.shape}")
        self._patches[channel].append((slice(rows.start, rows.stop), slice(cols.start, cols.stop), patch))

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        (c0, c1), (r0, r1), (x0, x1) = bounds = self._bounds(key)
        region = np.zeros((c1 - c0, r1 - r0, x1 - x0), dtype=self.dtype)
        self._paint(region, *bounds)
        return region

    def read_into(self, out: np.ndarray, key: tuple[slice, slice, slice]) -> None:
        """self[key] into the corner of `out` (from index 0 on every axis), 0 in the rest of `out`:
        chunk after chunk into one buffer, without allocating each (zarr_files)."""
        (c0, c1), (r0, r1), (x0, x1) = bounds = self._bounds(key)
        if out.ndim != 3 or any(n < m for n, m in zip(out.shape, (c1 - c0, r1 - r0, x1 - x0))):
            raise ValueError(f"{out.shape} cannot hold the region {key!r} of a mask of shape {self.shape}")
        out.fill(0)
        self._paint(out, *bounds)

    def _bounds(self, key: tuple[slice, slice, slice]) -> list[tuple[int, int]]:
        """(start, stop) per axis of `key`, clipped to the shape as numpy clips slices."""
        if not (isinstance(key, tuple) and len(key) == 3
                and all(isinstance(k, slice) and k.step in (None, 1) for k in key)):
            raise IndexError(f"a SparseMask is read by three step-1 slices, not {key!r}")
        return [(start, max(start, stop)) for start, stop in (k.indices(n)[:2] for k, n in zip(key, self.shape))]

    def _paint(self, out: np.ndarray, channels: tuple[int, int], rows: tuple[int, int],
               cols: tuple[int, int]) -> None:
        """OR the patches inside `channels` x `rows` x `cols` into `out`, whose index 0 is their start."""
        (c0, c1), (r0, r1), (x0, x1) = channels, rows, cols
        for channel in range(c0, c1):
            for patch_rows, patch_cols, patch in self._patches[channel]:
                overlap = _overlap(patch_rows, patch_cols, patch, r0, r1, x0, x1)
                if overlap is not None:
                    (top, left), part = overlap
                    height, width = part.shape
                    out[channel - c0, top - r0:top - r0 + height, left - x0:left - x0 + width] |= part

    def chunks_with_ones(self, chunks: tuple[int, int, int]) -> set[tuple[int, int, int]]:
        """The grid coordinates of the chunks (of shape `chunks`, from the origin) that hold a 1."""
        found = set()
        per_channel, height, width = chunks
        for channel, patches in enumerate(self._patches):
            for rows, cols, patch in patches:
                for i in range(rows.start // height, -(-rows.stop // height)):
                    for j in range(cols.start // width, -(-cols.stop // width)):
                        overlap = _overlap(rows, cols, patch, i * height, (i + 1) * height, j * width, (j + 1) * width)
                        if overlap is not None and overlap[1].any():
                            found.add((channel // per_channel, i, j))
        return found

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        dense = self[:, :, :]
        return dense if dtype is None else dense.astype(dtype, copy=False)


def _overlap(rows: slice, cols: slice, patch: np.ndarray, r0: int, r1: int, x0: int,
             x1: int) -> tuple[tuple[int, int], np.ndarray] | None:
    """The part of `patch` (over `rows` x `cols`) inside rows r0:r1 and columns x0:x1, with its
    top-left corner in mask coordinates; None where they do not meet."""
    top, bottom = max(rows.start, r0), min(rows.stop, r1)
    left, right = max(cols.start, x0), min(cols.stop, x1)
    if top >= bottom or left >= right:
        return None
    return (top, left), patch[top - rows.start:bottom - rows.start, left - cols.start:right - cols.start]
