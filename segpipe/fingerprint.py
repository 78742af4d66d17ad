"""A dataset's fingerprint: what the plan (segpipe/plan.py) needs to know of the data, measured
over every case given, one case in memory at a time.

- images: the distribution of heights and widths, distinct sizes, channels, pixel type; for videos
  the frames, frame rates and saturated warm-up frames;
- intensity per channel: mean, std and percentiles, from exact histograms of the integer pixels;
- per class: in how many labelled frames it appears, its foreground fraction, and the distribution
  of its objects (connected components) in number per frame, area and thinnest extent in pixels;
- for multi-label data, how much the classes overlap.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from scipy import ndimage

from segpipe.store import CaseStore, frames_of, labelled_frames

PERCENTILES = (0, 5, 50, 95, 100)


def distribution(values: list[float] | np.ndarray) -> dict[str, float]:
    """Percentiles and mean of `values`, rounded for a stable, readable JSON (empty: {})."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {}
    out = {f"p{p}": round(float(np.percentile(values, p)), 4) for p in PERCENTILES}
    return {**out, "mean": round(float(values.mean()), 4)}


def histogram_stats(counts: np.ndarray) -> dict[str, float]:
    """Mean, std and percentiles (0.5, 50, 99.5, as nnU-Net clips) of the pixel values a histogram counts."""
    values = np.arange(counts.size, dtype=np.float64)
    total = counts.sum()
    mean = float((counts * values).sum() / total)
    std = float(np.sqrt((counts * (values - mean) ** 2).sum() / total))
    cumulative = np.cumsum(counts) / total
    percentile = {f"p{p}": int(np.searchsorted(cumulative, p / 100)) for p in (0.5, 50, 99.5)}
    return {"mean": round(mean, 3), "std": round(std, 3), **percentile}


class Intensity:
    """Per-channel histograms of integer pixels, summed case by case."""

    def __init__(self) -> None:
        self.counts: list[np.ndarray] = []

    def add(self, frames: np.ndarray) -> None:
        """(T, H, W) or (T, H, W, C) unsigned integer frames."""
        channels = frames[..., None] if frames.ndim == 3 else frames
        bins = 2 ** (8 * frames.dtype.itemsize)
        for c in range(channels.shape[-1]):
            counts = np.bincount(channels[..., c].ravel(), minlength=bins)
            if len(self.counts) <= c:
                self.counts.append(counts)
            else:
                self.counts[c] += counts

    def stats(self) -> list[dict[str, float]]:
        return [histogram_stats(c) for c in self.counts]


def objects(mask: np.ndarray) -> tuple[int, list[int], list[int]]:
    """Connected components (8-connected) of a 2-D binary mask: how many, their areas in pixels,
    and their thinnest extent (the shorter side of each bounding box) in pixels."""
    labelled, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return 0, [], []
    areas = np.bincount(labelled.ravel(), minlength=n + 1)[1:]
    boxes = ndimage.find_objects(labelled)
    thin = [min(rows.stop - rows.start, cols.stop - cols.start) for rows, cols in boxes]
    return n, areas.tolist(), thin


def dark_lower_left(frame: np.ndarray) -> bool:
    """Whether the lower-left quarter box of an RGB frame is near black (an endoscope's inset)."""
    h, w = frame.shape[:2]
    return bool(frame[h - h // 4 :, : w // 4].mean() < 16)


class ClassStats:
    """One class's presence, foreground and objects over labelled frames."""

    def __init__(self) -> None:
        self.frames = self.present = 0
        self.fractions: list[float] = []
        self.counts: list[int] = []
        self.areas: list[int] = []
        self.thin: list[int] = []

    def add(self, mask: np.ndarray) -> None:
        n, areas, thin = objects(mask)
        self.frames += 1
        self.present += n > 0
        self.fractions.append(float(mask.mean()))
        self.counts.append(n)
        self.areas += areas
        self.thin += thin

    def summary(self) -> dict[str, Any]:
        counts = np.asarray(self.counts)
        present = counts[counts > 0]
        return {
            "labelled_frames": self.frames,
            "present_fraction": round(self.present / max(self.frames, 1), 4),
            "foreground_fraction": distribution(self.fractions),
            "objects_per_frame": distribution(present),
            "single_object_fraction": round(float((present == 1).mean()) if present.size else 0.0, 4),
            "object_area_px": distribution(self.areas),
            "object_thinnest_px": distribution(self.thin),
        }


def fingerprint(images: CaseStore, labels: CaseStore, case_ids: list[str]) -> dict[str, Any]:
    """The fingerprint of `case_ids` (see the module doc): images from `images`, masks and the
    frames they label from `labels`."""
    classes = labels.classes
    heights, widths, sizes, dtypes, channels = [], [], set(), set(), set()
    videos: dict[str, list[float]] = defaultdict(list)
    intensity, dark = Intensity(), []
    per_class = {name: ClassStats() for name in classes}
    overlap = np.zeros((len(classes), len(classes)), dtype=np.int64)
    foreground = 0
    for case in case_ids:
        video = images.is_video(case)
        pixels = frames_of(np.asarray(images.image(case)[...]), video)
        keep = labelled_frames(labels, case)
        heights.append(pixels.shape[1])
        widths.append(pixels.shape[2])
        sizes.add(pixels.shape[1:3])
        dtypes.add(str(pixels.dtype))
        channels.add(pixels.shape[3] if pixels.ndim == 4 else 1)
        if video:
            attrs = images.case_attrs(case)
            videos["frames"].append(len(pixels))
            videos["fps"].append(round(float(attrs.get("fps", 0.0)), 2))
            videos["warmup_frames"].append(int(attrs.get("warmup_frames", 0)))
        intensity.add(pixels)
        if pixels.ndim == 4 and pixels.shape[3] == 3:
            dark += [dark_lower_left(f) for f in pixels]
        case_masks = frames_of(labels.read(case, "mask"), video)  # (T, K, H, W)
        for f in keep:
            frame_masks = case_masks[f] > 0
            for k, name in enumerate(classes):
                per_class[name].add(frame_masks[k])
            layers = frame_masks.sum(axis=0)
            foreground += int((layers > 0).sum())
            if len(classes) > 1:
                shared = frame_masks[:, layers > 1].reshape(len(classes), -1).astype(np.int64)
                overlap += np.triu(shared @ shared.T, k=1)
    result = {
        "cases": len(case_ids),
        "labelled_frames": per_class[classes[0]].frames,
        "images": {
            "height_px": distribution(heights), "width_px": distribution(widths),
            "distinct_sizes": len(sizes), "channels": sorted(channels), "dtype": sorted(dtypes),
            "dark_lower_left_fraction": round(float(np.mean(dark)), 4) if dark else 0.0,
        },
        "video": {
            "videos": len(videos["frames"]), "frames": distribution(videos["frames"]),
            "fps": sorted(set(videos["fps"])), "warmup_frames": distribution(videos["warmup_frames"]),
        } if videos else None,
        "intensity": intensity.stats(),
        "classes": {name: stats.summary() for name, stats in per_class.items()},
    }
    if len(classes) > 1:
        result["overlap"] = overlap_summary(overlap, classes, foreground)
    return result


def overlap_summary(shared: np.ndarray, classes: list[str], foreground: int) -> dict[str, Any]:
    """How much multi-label classes overlap: the share of foreground pixels in two classes at once
    (counted per pair), and the pairs that share the most."""
    pairs = sorted(
        ((int(shared[i, j]), classes[i], classes[j]) for i, j in zip(*np.nonzero(shared))), reverse=True
    )
    return {
        "shared_pixel_fraction": round(float(shared.sum() / max(foreground, 1)), 4),
        "overlapping_pairs": len(pairs),
        "top_pairs": [{"classes": [a, b], "pixels": n} for n, a, b in pairs[:5]],
    }
