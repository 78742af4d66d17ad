"""The ensemble's arithmetic: the members' float16 probabilities, their weighted mean taken in
float32 and stored as float16, and the masks cut from it by per-class thresholds.

Portable, as segpipe.infer_core (see there): an exported bundle runs this very code, so its
probabilities and masks are the ensemble stage's, bit for bit.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from .preprocess import to_float16, to_float32


def weighted_mean(parts: Iterable[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted mean of float16 probability arrays of one shape, as float16 (what is stored and
    thresholded). Parts are taken one at a time, so a generator holds one member's in memory."""
    total = None
    for part, weight in zip(parts, weights, strict=True):
        part = torch.from_numpy(np.ascontiguousarray(part)).float()
        total = part.mul_(float(weight)) if total is None else total.add_(part, alpha=float(weight))
    return to_float16(total)


def cut(prob: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """uint8 masks of (..., K, H, W) float16 probabilities: 1 where a pixel's probability reaches
    its class's threshold, both compared in float32."""
    return (to_float32(prob) >= np.asarray(thresholds, dtype=np.float32)[:, None, None]).astype(np.uint8)
