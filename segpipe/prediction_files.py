"""The files `tasks.predict` writes for a person, from its predictions store, each at the input's size
and under its case id (a Kvasir or X-ray image's file stem):

    masks/<case>.png      one class (Kvasir): the mask, 0 or 255
    labels/<case>.png     several classes (hand bones): the class index, 1..K (0: none); where masks
                          of classes overlap, the class of highest probability
    overlays/<case>.png   the image with each class's pixels tinted in its colour (an .mp4 for a video)
    predictions.csv       a row per case and class (see CaseTally.rows)

The store itself (predictions.zarr) keeps every class's mask and float16 probability, and for a
video each frame's timestamp in seconds. Images are read a band of chunk rows at a time and videos a
batch of frames at a time, so memory holds a band, never a whole 29-class X-ray in float32.
"""
from __future__ import annotations

import colorsys
import csv
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from PIL import Image

from segpipe.config import PredictConfig
from segpipe.preprocess import to_float32
from segpipe.parallel import map_tracked
from segpipe.store import CaseStore

if TYPE_CHECKING:
    from distributed import Client

CSV_COLUMNS = ["case_id", "class", "frames", "area_px", "mean_probability", "max_probability", "threshold",
               "low_confidence"]
TINT = 0.45  # weight of a class's colour over the image in an overlay
VIDEO_BATCH = 16  # frames read at once
PNG_LEVEL = 1  # zlib level: an overlay photo compresses barely better at 6, at ~5x the time


def palette(n_classes: int) -> np.ndarray:
    """(K + 1, 3) uint8 colours: black for no class, then hues spread around the wheel (red first)."""
    hues = [colorsys.hsv_to_rgb(i / n_classes, 1.0, 1.0) for i in range(n_classes)]
    return np.array([(0, 0, 0)] + [tuple(round(255 * c) for c in rgb) for rgb in hues], dtype=np.uint8)


def label_map(prob: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(..., K, h, w) probabilities and masks -> (..., h, w) uint8 class index + 1 of the most probable
    masked class, 0 where no class is masked."""
    scores = np.where(mask, prob, -1.0)
    return np.where(mask.any(axis=-3), scores.argmax(axis=-3) + 1, 0).astype(np.uint8)


def to_display(pixels: np.ndarray) -> np.ndarray:
    """(h, w[, C]) pixels as 8-bit RGB: grey repeated, wider types scaled to their range."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        low, high = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - low) * (255 / max(high - low, 1e-12))).round().astype(np.uint8)
    return np.repeat(pixels[..., None], 3, axis=-1) if pixels.ndim == 2 else pixels[..., :3]


def overlay(pixels: np.ndarray, labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """The image with each labelled pixel tinted in its class's colour."""
    rgb = to_display(pixels).astype(np.float32)
    tinted = (1 - TINT) * rgb + TINT * colours[labels].astype(np.float32)
    return np.where(labels[..., None] > 0, tinted, rgb).round().astype(np.uint8)


@dataclass
class CaseTally:
    """Per class over a case's blocks: masked pixels, the probability summed over them, the highest probability."""

    area: np.ndarray
    prob_sum: np.ndarray
    max_prob: np.ndarray

    @classmethod
    def empty(cls, n_classes: int) -> CaseTally:
        return cls(np.zeros(n_classes, np.int64), np.zeros(n_classes), np.zeros(n_classes))

    def add(self, prob: np.ndarray, mask: np.ndarray) -> None:
        """A block of (B, K, h, w) float32 probabilities and bool masks."""
        axes = (0, 2, 3)
        self.area += mask.sum(axis=axes)
        self.prob_sum += np.where(mask, prob, 0).sum(axis=axes, dtype=np.float64)
        self.max_prob = np.maximum(self.max_prob, prob.max(axis=axes))

    def rows(self, case_id: str, classes: list[str], thresholds: list[float], frames: int,
             cfg: PredictConfig) -> list[dict[str, Any]]:
        """One CSV row per class. area_px: masked pixels (a video's: per frame, on average);
        mean_probability: over the masked pixels (empty where none); low_confidence: a region whose
        mean probability is below cfg.min_confidence, or no region though a pixel reached half of the
        class's threshold (a near miss)."""
        rows = []
        for k, name in enumerate(classes):
            area, top = int(self.area[k]), float(self.max_prob[k])
            mean = self.prob_sum[k] / area if area else None
            low = mean < cfg.min_confidence if mean is not None else top >= thresholds[k] / 2
            rows.append({"case_id": case_id, "class": name, "frames": frames, "area_px": round(area / frames, 1),
                         "mean_probability": "" if mean is None else round(mean, 4),
                         "max_probability": round(top, 4), "threshold": thresholds[k], "low_confidence": bool(low)})
        return rows


def save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, compress_level=PNG_LEVEL)


def write_image(predictions: CaseStore, images: CaseStore, case_id: str, out: Path, tally: CaseTally) -> None:
    prob, mask = predictions.array(case_id, "prob"), predictions.array(case_id, "mask")
    n_classes, height, width = prob.shape
    labels = np.zeros((height, width), dtype=np.uint8)
    step = prob.chunks[-2]
    for r in range(0, height, step):
        band_prob, band_mask = to_float32(prob[:, r : r + step])[None], mask[:, r : r + step][None].astype(bool)
        tally.add(band_prob, band_mask)
        labels[r : r + step] = label_map(band_prob, band_mask)[0]
    if n_classes == 1:
        save_png(out / "masks" / f"{case_id}.png", labels * np.uint8(255))
    else:
        save_png(out / "labels" / f"{case_id}.png", labels)
    save_png(out / "overlays" / f"{case_id}.png", overlay(np.asarray(images.image(case_id)), labels,
                                                          palette(n_classes)))


def write_video(predictions: CaseStore, images: CaseStore, case_id: str, out: Path, tally: CaseTally) -> None:
    """Per-frame masks stay in the store, with the frames' timestamps; the overlay is an MP4 at the video's rate."""
    prob, mask = predictions.array(case_id, "prob"), predictions.array(case_id, "mask")
    frames, colours = images.image(case_id), palette(prob.shape[1])
    attrs = images.case_attrs(case_id)
    fps = float(attrs.get("fps") or 25.0)
    timestamps = (images.read(case_id, "timestamps") if images.has(case_id, "timestamps")
                  else np.arange(prob.shape[0]) / fps)
    predictions.write_array(case_id, "timestamps", np.asarray(timestamps, dtype=np.float64))
    path = out / "overlays" / f"{case_id}.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        # yuv420p needs even sides: a frame of odd size is padded by its last row or column.
        stream.height, stream.width = (side + side % 2 for side in prob.shape[-2:])
        stream.pix_fmt = "yuv420p"
        for f in range(0, prob.shape[0], VIDEO_BATCH):
            block_prob = to_float32(prob[f : f + VIDEO_BATCH])
            block_mask = mask[f : f + VIDEO_BATCH].astype(bool)
            tally.add(block_prob, block_mask)
            for pixels, labels in zip(np.asarray(frames[f : f + VIDEO_BATCH]), label_map(block_prob, block_mask)):
                rgb = overlay(pixels, labels, colours)
                rgb = np.pad(rgb, ((0, rgb.shape[0] % 2), (0, rgb.shape[1] % 2), (0, 0)), mode="edge")
                container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())


def case_files(case_id: str, predictions: str, images: str, out: str, cfg: PredictConfig) -> list[dict[str, Any]]:
    """Write one case's files (on a Dask worker); its CSV rows."""
    store, source = CaseStore(predictions, mode="r+"), CaseStore(images)
    classes = store.classes
    thresholds = [float(store.attrs["thresholds"][name]["threshold"]) for name in classes]
    tally = CaseTally.empty(len(classes))
    video = store.is_video(case_id)
    (write_video if video else write_image)(store, source, case_id, Path(out), tally)
    frames = store.array(case_id, "prob").shape[0] if video else 1
    return tally.rows(case_id, classes, thresholds, frames, cfg)


def write_files(predictions: CaseStore, images: CaseStore, out: Path, cfg: PredictConfig, client: Client
                ) -> list[dict[str, Any]]:
    """Every case's files, written on the cluster, and predictions.csv in `out`; returns the CSV's rows."""
    per_case = map_tracked(client, case_files, predictions.case_ids(), "predict: files", predictions=str(predictions.path),
                           images=str(images.path), out=str(out), cfg=cfg)
    rows = [row for case_rows in per_case for row in case_rows]
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows
