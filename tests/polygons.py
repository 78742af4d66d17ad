"""An independent per-pixel statement of the hand masks' pixel convention, to test the reader's
scanline rasteriser against: a pixel is set when its centre (x = column, y = row, at integers) is
inside the polygon by the even-odd rule (W. R. Franklin's PNPOLY crossing test, in cross products
rather than divisions) or exactly on an edge."""
from __future__ import annotations

import numpy as np


def centres_in_or_on(points, height: int, width: int) -> np.ndarray:
    """(height, width) bool: the pixels the convention sets for the polygon `points` ([[x, y], ...])."""
    xy = np.asarray(points, dtype=np.float64)
    x0, y0 = np.maximum(np.floor(xy.min(axis=0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(xy.max(axis=0)).astype(int), [width - 1, height - 1])
    mask = np.zeros((height, width), dtype=bool)
    if x1 < x0 or y1 < y0:
        return mask
    ys, xs = np.mgrid[y0:y1 + 1, x0:x1 + 1].astype(np.float64)  # only the bounding box can be set
    inside = np.zeros(xs.shape, dtype=bool)
    on = np.zeros(xs.shape, dtype=bool)
    for (px, py), (qx, qy) in zip(xy, np.roll(xy, -1, axis=0)):
        cross = (qx - px) * (ys - py) - (qy - py) * (xs - px)  # > 0: the centre is left of p -> q
        between = (min(px, qx) <= xs) & (xs <= max(px, qx)) & (min(py, qy) <= ys) & (ys <= max(py, qy))
        on |= (cross == 0) & between
        straddles = (py > ys) != (qy > ys)
        inside ^= straddles & ((cross > 0) if qy > py else (cross < 0))
    mask[y0:y1 + 1, x0:x1 + 1] = inside | on
    return mask
