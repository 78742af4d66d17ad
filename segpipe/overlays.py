"""Overlays of one frame for a reader's eye: the image, the truth, the prediction, and the errors
coloured (missed in blue, invented in red, a pixel of one class taken for another in magenta,
right in green).

Drawn at most `size` px a side: a 2048 px hand is read one class at a time at full resolution, its
errors found there, and each map reduced by "any pixel in the block", so that a thin missed edge
stays visible instead of falling between sampled pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from segpipe.report_plots import png
from segpipe.store import CaseStore

# RGB in [0, 1]: right, invented (false positive), missed (false negative), one class taken for another
TP, FP, FN, SWAP = (0.16, 0.67, 0.24), (0.9, 0.16, 0.16), (0.16, 0.43, 1.0), (0.86, 0.0, 0.86)


@dataclass(frozen=True)
class FrameMaps:
    """One frame reduced for display: the image (h, w[, 3]), class maps of truth and prediction
    (h, w) holding the last class present + 1 (0: none), and the error maps (h, w) bool."""

    image: np.ndarray
    truth: np.ndarray
    pred: np.ndarray
    missed: np.ndarray
    invented: np.ndarray
    right: np.ndarray


def pooled(mask: np.ndarray, step: int) -> np.ndarray:
    """(H, W) bool reduced by `step` with "any pixel in the block" (edges padded with False)."""
    h, w = -(-mask.shape[0] // step), -(-mask.shape[1] // step)
    padded = np.zeros((h * step, w * step), dtype=bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return padded.reshape(h, step, w, step).any(axis=(1, 3))


def frame_maps(images: CaseStore, labels: CaseStore, pred: CaseStore, case_id: str, frame: int, size: int) -> FrameMaps:
    """Read one frame of a case (full resolution, one class at a time) and reduce it for display."""
    video = images.is_video(case_id)
    truth_array, pred_array = labels.array(case_id, "mask"), pred.array(case_id, "mask")
    height, width = truth_array.shape[-2:]
    step = max(1, -(-max(height, width) // size))
    image = images.image(case_id)
    image = np.asarray(image[frame, ::step, ::step] if video else image[::step, ::step])
    shape = (-(-height // step), -(-width // step))  # as image[::step, ::step]
    maps = {name: np.zeros(shape, dtype=np.uint8 if name in ("truth", "pred") else bool)
            for name in ("truth", "pred", "missed", "invented", "right")}
    for k in range(truth_array.shape[-3]):
        t = np.asarray(truth_array[frame, k] if video else truth_array[k]) != 0
        p = np.asarray(pred_array[frame, k] if video else pred_array[k]) != 0
        for name, mask in (("missed", t & ~p), ("invented", p & ~t), ("right", t & p)):
            maps[name] |= pooled(mask, step)
        maps["truth"][pooled(t, step)] = k + 1
        maps["pred"][pooled(p, step)] = k + 1
    return FrameMaps(image=image, **maps)


def grey_rgb(image: np.ndarray) -> np.ndarray:
    """The image as float RGB in [0, 1], its 1st-99th percentiles stretched (16-bit X-rays are dark)."""
    image = image.astype(np.float32)
    low, high = np.percentile(image, (1, 99))
    scaled = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    return scaled if scaled.ndim == 3 else np.repeat(scaled[..., None], 3, axis=-1)


def painted(base: np.ndarray, layers: list[tuple[np.ndarray, tuple[float, float, float]]], alpha: float) -> np.ndarray:
    out = base.copy()
    for where, colour in layers:
        out[where] = (1 - alpha) * out[where] + alpha * np.asarray(colour)
    return out


def class_layers(classes_map: np.ndarray, n_classes: int) -> list[tuple[np.ndarray, tuple[float, float, float]]]:
    """A colour per class: tab20's distinct ones, or a rainbow for more classes (29 hand bones)."""
    if n_classes <= 20:
        colours = [colormaps["tab20"](k)[:3] for k in range(n_classes)]
    else:
        colours = [colormaps["gist_rainbow"](k / (n_classes - 1))[:3] for k in range(n_classes)]
    return [(classes_map == k + 1, colour) for k, colour in enumerate(colours)]


def overlay_png(maps: FrameMaps, n_classes: int) -> bytes:
    """Four panels side by side: image, truth, prediction, errors; as PNG bytes."""
    base = grey_rgb(maps.image)
    swap = maps.missed & maps.invented  # one class missed where another was predicted
    errors = painted(base * 0.6, [(maps.right & ~maps.missed & ~maps.invented, TP), (maps.invented & ~swap, FP),
                                  (maps.missed & ~swap, FN), (swap, SWAP)], alpha=0.85)
    panels = [("image", base), ("truth", painted(base, class_layers(maps.truth, n_classes), 0.5)),
              ("prediction", painted(base, class_layers(maps.pred, n_classes), 0.5)),
              ("errors: FN blue, FP red, wrong class magenta, TP green", errors)]
    h, w = base.shape[:2]
    fig = Figure(figsize=(4 * 3.2, 3.2 * h / w + 0.3))
    axes = fig.subplots(1, 4)
    for ax, (name, pixels) in zip(axes, panels):
        ax.imshow(np.clip(pixels, 0, 1), interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_axis_off()
    return png(fig)
