"""The U-Net border weight map against hand-computed small examples and a brute-force reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from segpipe.weightmap import weight_map


def two_boxes(gap: int) -> np.ndarray:
    """(2, 12, 16): channel 0 two 6x5 boxes `gap` columns apart; channel 1 one box overlapping them."""
    mask = np.zeros((2, 12, 16), np.uint8)
    mask[0, 3:9, 2:7] = 1
    mask[0, 3:9, 7 + gap : 12 + gap] = 1
    mask[1, 4:8, 4:11] = 1
    return mask


def test_the_gap_between_two_objects_weighs_about_w0_plus_the_class_weight():
    w = weight_map(two_boxes(gap=1), w0=10, sigma=5)
    fg = 60 / 192  # two 6x5 boxes in 12x16
    w_bg, w_fg = 0.5 / (1 - fg), 0.5 / fg
    # In a 1-px gap d1 = d2 = 1: w = w_c + 10 exp(-4 / 50) ~ 0.92 w0 + w_c.
    assert w[0, 5, 7] == pytest.approx(w_bg + 10 * math.exp(-4 / 50), rel=1e-5)
    assert w[0, 5, 7] == pytest.approx(10 + w_bg, rel=0.1)
    assert w[0, 5, 4] == pytest.approx(w_fg, rel=1e-6)  # inside an object: class weight only


def test_distances_to_the_nearest_and_second_nearest_object_set_the_border_term():
    w = weight_map(two_boxes(gap=2), w0=10, sigma=5)
    w_bg = 0.5 / (1 - 60 / 192)
    # In the 2-px gap, column 7: 1 px to the left box, 2 px to the right one.
    assert w[0, 5, 7] == pytest.approx(w_bg + 10 * math.exp(-(1 + 2) ** 2 / 50), rel=1e-5)
    # Corner (0, 0): nearest box pixel (3, 2) at sqrt(13), the other box's (3, 9) at sqrt(90).
    assert w[0, 0, 0] == pytest.approx(w_bg + 10 * math.exp(-((13**0.5 + 90**0.5) ** 2) / 50), rel=1e-5)


def test_a_channel_with_one_object_gets_class_balance_only_whatever_other_channels_hold():
    w = weight_map(two_boxes(gap=1), w0=10, sigma=5)
    fg = 28 / 192
    expected = np.where(two_boxes(gap=1)[1], 0.5 / fg, 0.5 / (1 - fg))
    np.testing.assert_allclose(w[1], expected, rtol=1e-6)
    assert w[1].mean() == pytest.approx(1.0, rel=1e-6)  # foreground and background carry half each


def test_an_empty_channel_weighs_one_everywhere():
    w = weight_map(np.zeros((3, 8, 8), np.uint8))
    assert w.dtype == np.float32 and w.shape == (3, 8, 8)
    np.testing.assert_array_equal(w, 1.0)


def brute_force(channel: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """The formula, literally: full-image distances to every object, sorted per pixel."""
    labels, n = ndimage.label(channel)
    fg = channel.mean()
    w = np.where(channel, 0.5 / fg, 0.5 / (1 - fg))
    if n < 2:
        return w
    d = np.sort(np.stack([ndimage.distance_transform_edt(labels != i) for i in range(1, n + 1)]), axis=0)
    return w + np.where(channel, 0, w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2)))


def test_matches_the_literal_formula_on_scattered_objects_of_a_large_image():
    """Distances are computed in each object's grown box only: far objects must not change the result."""
    rng = np.random.default_rng(0)
    mask = (ndimage.gaussian_filter(rng.random((2, 160, 200)), 3) > 0.53).astype(np.uint8)
    assert ndimage.label(mask[0])[1] >= 5
    w = weight_map(mask, w0=10, sigma=5)
    for k in range(2):
        np.testing.assert_allclose(w[k], brute_force(mask[k].astype(bool), 10, 5), rtol=1e-5, atol=1e-4)


def test_a_mask_without_a_class_axis_is_rejected():
    with pytest.raises(ValueError, match=r"expected a \(K, H, W\) mask, got shape \(8, 8\)"):
        weight_map(np.zeros((8, 8), np.uint8))
