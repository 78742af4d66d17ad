"""Per-class thresholds tuned on validation probabilities: the threshold of best mean Dice.

Every candidate is scored in one pass: each sample's (frame's) probabilities of a class fall into
the bins between consecutive candidates, positive and negative pixels apart, and the counts at a
threshold are the sums of the bins above it. Dice follows the convention of segpipe.metrics, so
tuning maximises the figure `evaluate` reports.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from segpipe.metrics import scores

MAX_CANDIDATES = 127  # bin index plus a positive flag must fit one uint8 key for torch.bincount


def candidates(step: float, fixed: float) -> np.ndarray:
    """step, 2*step, ... below 1, and the fixed threshold: sorted float32, the precision masks are cut at."""
    grid = np.round(np.arange(step, 1 - 1e-9, step), 6)
    out = np.unique(np.append(grid, fixed).astype(np.float32))
    if len(out) > MAX_CANDIDATES:
        raise ValueError(f"{len(out)} candidate thresholds; at most {MAX_CANDIDATES}")
    return out


def bin_lookup(thresholds: np.ndarray) -> np.ndarray:
    """For every float16 bit pattern, how many thresholds its value reaches (`value >= t`).

    A 64 K table read with the probabilities' bits bins them exactly as the masks are cut, ~25x
    faster than searchsorted on hand X-rays.
    """
    values = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)
    table = np.searchsorted(thresholds, values, side="right").astype(np.uint8)
    table[np.isnan(values)] = 0  # NaN reaches no threshold, as NaN >= t is false
    return table


def histograms(prob: np.ndarray, target: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """(B, C, H, W) float16 probabilities and binary targets -> (B, C, 2, n_bins) pixel counts per bin,
    negatives then positives, where n_bins is the number of thresholds + 1."""
    n_bins = int(lookup.max()) + 1
    keys = lookup[np.ascontiguousarray(prob, dtype=np.float16).view(np.uint16)]
    keys += np.uint8(n_bins) * (np.asarray(target) != 0).view(np.uint8)
    out = np.empty(prob.shape[:2] + (2, n_bins), dtype=np.int64)
    for b in range(prob.shape[0]):
        for c in range(prob.shape[1]):
            counts = torch.bincount(torch.from_numpy(keys[b, c].ravel()), minlength=2 * n_bins)
            out[b, c] = counts.numpy().reshape(2, n_bins)
    return out


def dice_curves(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, 2, n_bins) counts -> positive pixels per class (K,) and mean Dice over the N samples
    per class and threshold (K, n_bins - 1)."""
    # Pixels in bin i reach thresholds 0..i-1, so those reaching threshold j lie in bins j+1 and up.
    reached = np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1][..., 1:]
    fp, tp = reached[:, :, 0], reached[:, :, 1]
    fn = hist[:, :, 1].sum(axis=-1, keepdims=True) - tp
    dice = scores({"tp": tp, "fp": fp, "fn": fn})["dice"].mean(axis=0)
    return hist[:, :, 1].sum(axis=(0, 2)), dice


def fixed_choice(fixed: float, source: str, val_dice: float | None = None) -> dict[str, Any]:
    return {"threshold": fixed, "source": source, "val_dice": val_dice, "val_dice_at_fixed": val_dice}


def choose(thresholds: np.ndarray, dice: np.ndarray, positives: np.ndarray, fixed: float) -> list[dict[str, Any]]:
    """Per class, the threshold of best mean validation Dice, with that Dice, the fixed threshold's,
    and for a tuned class the whole curve (dice_curve).

    Ties go to the candidate nearest the fixed threshold, so tuning moves away from it only on
    evidence; a class with no positive validation pixel keeps it (any high threshold would "win").
    """
    at_fixed = int(np.flatnonzero(thresholds == np.float32(fixed))[0])
    choices = []
    for k, curve in enumerate(dice):
        if positives[k] == 0:
            choices.append(fixed_choice(fixed, "no positive validation pixels", float(curve[at_fixed])))
            continue
        best = np.flatnonzero(curve == curve.max())
        j = best[np.argmin(np.abs(thresholds[best] - np.float32(fixed)))]
        choices.append({
            "threshold": round(float(thresholds[j]), 6), "source": "tuned",
            "val_dice": float(curve[j]), "val_dice_at_fixed": float(curve[at_fixed]),
            "val_dice_curve": dice_curve(thresholds, curve),
        })
    return choices


def dice_curve(thresholds: np.ndarray, dice: np.ndarray) -> dict[str, list[float]]:
    """One class's validation Dice at every candidate, as recorded beside its choice, so that the
    evaluation report can draw what tuning saw (rounded: 6 decimals are plenty for a plot)."""
    return {"thresholds": [round(float(t), 6) for t in thresholds], "val_dice": [round(float(d), 6) for d in dice]}
