"""HD95 and NSD: hand-computed cases, the empty-mask convention where MONAI has no number, and
MONAI's own results on random masks (which the crop to the drawn pixels must not change)."""
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from segpipe.boundary_metrics import boundary_scores, frame_diagonal


def masks(shape, *boxes):
    """(1, 1, H, W) bool with the given (row slice, col slice) boxes set."""
    out = np.zeros((1, 1, *shape), bool)
    for rows, cols in boxes:
        out[0, 0, rows, cols] = True
    return out


def scored(pred, ref, tolerance=2.0):
    out = boundary_scores(pred, ref, tolerance)
    return float(out["hd95"][0, 0]), float(out["nsd"][0, 0])


def test_a_class_absent_from_both_sides_scores_hd95_0_and_nsd_1():
    empty = masks((6, 8))
    assert scored(empty, empty) == (0.0, 1.0)


def test_a_class_absent_from_one_side_scores_the_frame_diagonal_and_nsd_0():
    empty, dot = masks((6, 8)), masks((6, 8), (slice(2, 3), slice(3, 4)))
    assert frame_diagonal((6, 8)) == 10.0
    assert scored(empty, dot) == (10.0, 0.0)
    assert scored(dot, empty) == (10.0, 0.0)


def test_monai_has_no_number_exactly_where_the_convention_decides():
    empty, dot = masks((6, 8)), masks((6, 8), (slice(2, 3), slice(3, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for pred, ref in ((empty, empty), (empty, dot), (dot, empty)):
            hd = compute_hausdorff_distance(torch.from_numpy(pred), torch.from_numpy(ref), include_background=True,
                                            percentile=95)
            assert not np.isfinite(hd.item())
        none = torch.from_numpy(empty)
        assert np.isnan(compute_surface_dice(none, none, [2.0], include_background=True).item())


def test_full_masks_match_perfectly():
    full = masks((5, 7), (slice(None), slice(None)))
    assert scored(full, full) == (0.0, 1.0)


def test_one_pixel_objects_score_their_distance():
    here, there = masks((10, 10), (slice(1, 2), slice(1, 2))), masks((10, 10), (slice(4, 5), slice(5, 6)))
    assert scored(here, here) == (0.0, 1.0)
    assert scored(here, there, tolerance=4.9) == (5.0, 0.0)  # 3 rows and 4 columns apart
    assert scored(here, there, tolerance=5.0) == (5.0, 1.0)  # within the tolerance: counted right


def test_two_squares_at_a_known_distance():
    # Two 5x5 squares 20 columns apart. From the left square's 16 edge pixels to the right square's
    # edge: 16 (5 pixels of its right column), 17, 18, 19 (2 each, top and bottom rows), 20 (its left
    # column, 5); the 95th percentile of those 16 values is 20, and symmetric the other way.
    left, right = masks((20, 40), (slice(5, 10), slice(5, 10))), masks((20, 40), (slice(5, 10), slice(25, 30)))
    assert scored(left, right) == (20.0, 0.0)


def test_a_shifted_square_is_within_a_tolerance_of_its_shift():
    a, b = masks((30, 30), (slice(5, 15), slice(5, 15))), masks((30, 30), (slice(5, 15), slice(7, 17)))
    hd95, nsd = scored(a, b, tolerance=2.0)
    assert hd95 == 2.0 and nsd == 1.0
    assert scored(a, b, tolerance=1.0)[1] < 1.0


def test_random_masks_score_as_monai_scores_them_whole():
    rng = np.random.default_rng(0)
    pred, ref = np.zeros((3, 2, 48, 64), bool), np.zeros((3, 2, 48, 64), bool)
    for mask in (pred, ref):  # a few random blobs each, away from and touching the frame's border
        for index in np.ndindex(mask.shape[:2]):
            for _ in range(3):
                r, c = rng.integers(0, 40), rng.integers(0, 56)
                mask[index][r : r + rng.integers(2, 12), c : c + rng.integers(2, 12)] = True
    ours = boundary_scores(pred, ref, tolerance=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(torch.from_numpy(pred), torch.from_numpy(ref), include_background=True,
                                        percentile=95).numpy()
        nsd = compute_surface_dice(torch.from_numpy(pred), torch.from_numpy(ref), [1.5, 1.5],
                                   include_background=True).numpy()
    np.testing.assert_allclose(ours["hd95"], hd, rtol=1e-6)
    np.testing.assert_allclose(ours["nsd"], nsd, rtol=1e-6)
    assert len(np.unique(ours["hd95"])) > 3  # varied pairs, not one repeated answer


def test_masks_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        boundary_scores(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4, 5)), 1.0)
