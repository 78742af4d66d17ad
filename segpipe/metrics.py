"""Overlap metrics per sample (image or video frame) and class, on binary masks.

Convention (as in most segmentation benchmarks for multi-label data): a class absent from both
the prediction and the reference of a sample scores 1 on every metric, since nothing was missed
and nothing was invented; absent from one of them, it scores 0.
"""
from __future__ import annotations

import numpy as np

def confusion(pred: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """True/false positive and false negative counts per sample and class of (N, K, H, W) masks."""
    pred, target = pred.astype(bool), target.astype(bool)
    axes = tuple(range(2, pred.ndim))
    return {
        "tp": np.sum(pred & target, axis=axes, dtype=np.int64),
        "fp": np.sum(pred & ~target, axis=axes, dtype=np.int64),
        "fn": np.sum(~pred & target, axis=axes, dtype=np.int64),
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.ones(num.shape, dtype=np.float64), where=den > 0)


def scores(counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-sample, per-class metrics (N, K) from confusion counts."""
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        # With no predicted (or no true) pixels, precision (recall) is 1 only if the other side is empty too.
        "precision": np.where(tp + fp > 0, _ratio(tp, tp + fp), (fn == 0).astype(np.float64)),
        "recall": np.where(tp + fn > 0, _ratio(tp, tp + fn), (fp == 0).astype(np.float64)),
    }


def summarize(per_sample: dict[str, np.ndarray], classes: list[str]) -> dict:
    """Means over samples per class, and the mean over classes as the headline figure, of every
    metric in `per_sample` (name -> (N, K) values)."""
    per_class = {
        name: {m: float(values[:, k].mean()) for m, values in per_sample.items()} for k, name in enumerate(classes)
    }
    headline = {m: float(np.mean([per_class[c][m] for c in classes])) for m in per_sample}
    return {**headline, "n_samples": int(per_sample["dice"].shape[0]), "per_class": per_class}


def mean_dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean Dice over samples and classes: the validation figure training selects on."""
    return float(scores(confusion(pred, target))["dice"].mean())
