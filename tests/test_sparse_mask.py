"""segpipe.sparse_mask reads like the dense mask it stands for."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from segpipe.sparse_mask import SparseMask

SHAPE = (5, 37, 53)


def random_mask(rng: np.random.Generator, n_patches: int,
                shape: tuple[int, int, int] = SHAPE) -> tuple[SparseMask, np.ndarray]:
    """Patches anywhere, several per channel, overlapping each other, some touching the edges or
    empty; and the dense mask built by numpy alone."""
    sparse, dense = SparseMask(shape), np.zeros(shape, np.uint8)
    for _ in range(n_patches):
        channel = int(rng.integers(shape[0]))
        top, left = int(rng.integers(shape[1])), int(rng.integers(shape[2]))
        rows = slice(top, int(rng.integers(top, shape[1] + 1)))
        cols = slice(left, int(rng.integers(left, shape[2] + 1)))
        patch = rng.random((rows.stop - rows.start, cols.stop - cols.start)) < 0.6
        sparse.add(channel, rows, cols, patch)
        dense[channel, rows, cols] |= patch
    return sparse, dense


def test_every_region_equals_that_region_of_the_dense_mask():
    rng = np.random.default_rng(0)
    sparse, dense = random_mask(rng, 40)
    assert dense.any() and not dense.all()  # the patches overlap some but not all of the mask
    np.testing.assert_array_equal(np.asarray(sparse), dense)
    assert np.asarray(sparse, dtype=bool).dtype == bool and sparse.shape == SHAPE and sparse.ndim == 3

    def bound(n: int) -> int | None:  # anywhere, negative, past either end (numpy clips), or None
        return None if rng.random() < 0.1 else int(rng.integers(-n - 3, n + 3))

    for _ in range(500):
        key = tuple(slice(bound(n), bound(n)) for n in SHAPE)
        region = sparse[key]
        assert region.dtype == np.uint8
        np.testing.assert_array_equal(region, dense[key], err_msg=str(key))


def test_a_region_read_into_a_larger_buffer_fills_its_corner_and_zeroes_the_rest():
    """As zarr_files cuts chunks: one buffer, reused, the edge chunks padded with 0."""
    rng = np.random.default_rng(4)
    sparse, dense = random_mask(rng, 40)
    buffer = np.full((3, 40, 40), 7, dtype=np.uint8)  # stale content everywhere
    for _ in range(200):
        start = [int(rng.integers(0, n)) for n in SHAPE]
        key = tuple(slice(a, a + int(rng.integers(0, 41)) if i else a + int(rng.integers(0, 4))) for i, a in enumerate(start))
        sparse.read_into(buffer, key)
        region = dense[key]
        np.testing.assert_array_equal(buffer[tuple(slice(0, n) for n in region.shape)], region, err_msg=str(key))
        assert buffer.sum() == region.sum(), key
    with pytest.raises(ValueError, match="cannot hold the region"):
        sparse.read_into(np.zeros((3, 10, 40), np.uint8), (slice(0, 3), slice(0, 11), slice(0, 40)))


def test_reading_a_region_returns_a_new_array_not_the_patches():
    sparse = SparseMask((1, 4, 4))
    patch = np.ones((2, 2), bool)
    sparse.add(0, slice(1, 3), slice(1, 3), patch)
    sparse[:, :, :][0, 1, 1] = 0
    assert np.asarray(sparse).sum() == 4 and patch.all()


@pytest.mark.parametrize("key", [(0, slice(None), slice(None)), (slice(None), slice(None)), slice(None), Ellipsis, 0,
                                 [slice(None)] * 3, (slice(None), slice(None, None, 2), slice(None))])
def test_other_indexing_is_refused(key):
    with pytest.raises(IndexError, match="three step-1 slices"):
        SparseMask(SHAPE)[key]


@pytest.mark.parametrize("channel, rows, cols, patch_shape", [
    (5, slice(0, 2), slice(0, 2), (2, 2)),  # no such channel
    (-1, slice(0, 2), slice(0, 2), (2, 2)),
    (0, slice(0, 3), slice(0, 3), (1, 3)),  # the patch is not the box's shape
    (0, slice(36, 38), slice(0, 2), (2, 2)),  # past the last row
    (0, slice(0, 2, 2), slice(0, 2), (2, 2)),  # a step
])
def test_a_patch_that_does_not_fit_is_refused(channel, rows, cols, patch_shape):
    with pytest.raises(ValueError, match="does not fit a mask of shape"):
        SparseMask(SHAPE).add(channel, rows, cols, np.ones(patch_shape, bool))


@pytest.mark.parametrize("chunks", [(1, 8, 8), (1, 37, 53), (2, 5, 16), (5, 37, 53), (1, 64, 64)])
def test_the_chunks_with_ones_are_those_of_the_dense_mask(chunks):
    sparse, dense = random_mask(np.random.default_rng(3), 15)
    sparse.add(4, slice(0, 37), slice(0, 53), np.zeros((37, 53), bool))  # a patch without a 1 adds no chunk
    grid = [range(-(-n // c)) for n, c in zip(SHAPE, chunks)]
    expected = {coords for coords in itertools.product(*grid)
                if dense[tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, chunks))].any()}
    assert sparse.chunks_with_ones(chunks) == expected
    assert expected and (len(expected) < np.prod([len(r) for r in grid]) or chunks[1] >= 37)  # some empty ones
