"""The U-Net paper's per-pixel loss weights (Ronneberger et al. 2015, eq. 2), channel by channel:

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

w_c balances foreground against background; d1 and d2 are the distances to the nearest and the
second-nearest object (connected component) of that channel. Channels are independent, so
overlapping objects of different classes (hand bones) never count as neighbours. The border term
is applied to background pixels only: the thin gaps between objects are what it must teach (the
paper's Fig. 3d); inside an object d1 = 0 and it would weight object rims instead.

Cost: one connected-component labelling per channel (within the foreground's bounding box) and,
only in channels with two or more objects, one distance transform per object, over its bounding box
grown by `reach` (beyond it the border term is below w0 * 1e-6). On one CPU core a 29 x 256 x 256
hand mask (one object per channel) takes ~5-12 ms; a worst case of ~70 blobs in each of 29
channels ~0.7 s, 26x less than the literal formula (benchmarks/weight_map.py). Compute it once
per mask and cache it where samples repeat.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

NEGLIGIBLE = 1e-6  # border terms below w0 * NEGLIGIBLE are left out


def class_balance(mask: np.ndarray) -> np.ndarray:
    """w_c of a (K, H, W) bool mask: in each channel foreground and background carry half the total
    weight each (so the mean weight is 1); a channel of one class only gets weight 1."""
    fg = np.count_nonzero(mask, axis=(1, 2)).reshape(-1, 1, 1) / mask[0].size
    one_class = (fg == 0) | (fg == 1)
    fg_weight = np.where(one_class, 1, 0.5 / np.where(one_class, 1, fg)).astype(np.float32)
    bg_weight = np.where(one_class, 1, 0.5 / np.where(one_class, 1, 1 - fg)).astype(np.float32)
    return np.where(mask, fg_weight, bg_weight)


def objects(channel: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a (H, W) bool channel, labelled within its foreground's bounding box
    only: a bone covers a small part of the image, and labelling dominates the cost otherwise."""
    labels = np.zeros(channel.shape, np.int32)
    rows, cols = np.flatnonzero(channel.any(axis=1)), np.flatnonzero(channel.any(axis=0))
    if rows.size == 0:
        return labels, 0
    box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    labels[box], n = ndimage.label(channel[box])
    return labels, n


def two_nearest_distances(labels: np.ndarray, reach: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the distances to the nearest and second-nearest labelled object, inf where an
    object is farther than `reach` (measured only within each object's grown bounding box)."""
    d1 = np.full(labels.shape, np.inf, np.float32)
    d2 = np.full(labels.shape, np.inf, np.float32)
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        grown = tuple(slice(max(s.start - reach, 0), s.stop + reach) for s in box)
        d = ndimage.distance_transform_edt(labels[grown] != i).astype(np.float32)
        near, second = d1[grown], d2[grown]  # views: updated in place
        np.minimum(second, np.maximum(near, d), out=second)
        np.minimum(near, d, out=near)
    return d1, d2


def weight_map(mask: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """(K, H, W) binary mask -> (K, H, W) float32 per-pixel loss weights (see the module doc)."""
    if mask.ndim != 3:
        raise ValueError(f"weight_map: expected a (K, H, W) mask, got shape {mask.shape}")
    reach = int(np.ceil(sigma * np.sqrt(2 * np.log(1 / NEGLIGIBLE))))
    mask = mask.astype(bool)
    out = class_balance(mask)
    for k, channel in enumerate(mask):
        labels, n_objects = objects(channel)
        if n_objects >= 2:  # a lone object has no second-nearest: its border term is 0
            d1, d2 = two_nearest_distances(labels, reach)
            out[k] += np.where(channel, 0, w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2)))
    return out
