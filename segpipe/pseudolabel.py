"""Classical, unsupervised airway pseudo-labels for real-time MRI videos of the vocal tract.

Real rtMRI comes without masks, so the training labels are made here from the images alone:

1. Per video, from the steady-state frames only (warm-up frames are over-bright): the air level
   (noise floor), a map of the local tissue level (coil shading and dim tissue at the back of
   the head make one global threshold wrong), and the air outside the head: dark regions
   connected to the left, top or right border. The airway leaves the image only at the bottom,
   down the pharynx; an opening first cuts the thin bridges that noise or parted lips make.
2. Per frame: a pixel is air where it is below the midpoint between air and local tissue (the
   partial-volume boundary), and inside the head.
3. The airway is where the video agrees: the main region of the "often dark" map, preferring
   one that reaches the bottom edge, trimmed to the passage from the lips to the larynx (dead
   ends such as the sinuses go).
4. A temporal median over `smooth_frames` frames, then a confidence per frame from the
   airway/tissue contrast, agreement with the neighbouring frames, plausibility of the area and
   the frame's brightness: noise and saturated frames score low.

Tuned on the demo phantom and checked by eye on the real USC-TIMIT and 75-speaker clips in
../shared/data, which it follows from the mouth down the pharynx.
"""
from __future__ import annotations

import logging
from pathlib import Path
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_multiotsu
from skimage.graph import MCP_Geometric

from segpipe.atomic import Owner, atomic_dir
from segpipe.config import PseudolabelConfig
from segpipe.store import VIDEO, CaseStore

log = logging.getLogger(__name__)

CLASSES = ["airway"]
_CROSS = ndimage.generate_binary_structure(2, 1)
_SQUARE = ndimage.generate_binary_structure(2, 2)


def label_video(frames: np.ndarray, warmup: int, cfg: PseudolabelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Airway masks (T, H, W) uint8 0/1 and per-frame confidence (T,) float32 in [0, 1].

    Frames before `warmup` are not in steady state: they get an empty mask and confidence 0.
    """
    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"frames must be (T, H, W), got shape {frames.shape}")
    n = len(frames)
    masks = np.zeros(frames.shape, np.uint8)
    confidence = np.zeros(n, np.float32)
    warmup = max(0, min(int(warmup), n))
    if n - warmup < 1:
        return masks, confidence
    video = frames[warmup:].astype(np.float32)
    if len(np.unique(video.mean(axis=0))) < 4:  # blank or near-constant: no air/tissue to tell apart
        log.warning("video of shape %s has no contrast: no pseudo-labels", frames.shape)
        return masks, confidence
    levels = _VideoLevels.of(video)
    raw = np.stack([_dark_inside_head(levels.normalise(f, t), levels.outside) for t, f in enumerate(video)])
    region = _airway_region(raw)
    raw = np.stack([_in_region(m, region) for m in raw])
    smooth = _temporal_median(raw, cfg.smooth_frames)
    masks[warmup:] = smooth
    confidence[warmup:] = _confidence(video, raw, smooth, levels)
    return masks, confidence


class _VideoLevels:
    """Intensity references of one video, from its steady-state frames."""

    def __init__(self, air: float, tissue_map: np.ndarray, outside: np.ndarray, frame_level: np.ndarray,
                 saturated: np.ndarray):
        self.air = air  # the noise floor: what air looks like
        self.tissue_map = tissue_map  # local tissue level (H, W)
        self.outside = outside  # the air around the head (H, W) bool
        self.frame_level = frame_level  # each frame's brightness relative to the video's
        self.saturated = saturated  # each frame's fraction of saturated pixels

    @classmethod
    def of(cls, video: np.ndarray) -> _VideoLevels:
        mean = video.mean(axis=0)
        # Four classes (air, dim, mid, bright tissue): the lowest split keeps the dim tissue at the
        # back of the head and the pharyngeal wall out of the air class, as real clips need.
        low = threshold_multiotsu(mean, classes=4)[0]
        air = float(np.median(mean[mean < low]))
        tissue = mean >= low
        per_frame = np.array([f[tissue].mean() for f in video])
        saturated = (video >= 250).mean(axis=(1, 2))
        # Lips and chin move, which blurs the face's edge in the mean: in front of the face (from
        # the left border) air is whatever is dark in at least 30% of the frames. Not elsewhere: at
        # the back of the head dim tissue, as often dark, would join the pharynx to the outside.
        front = _outside(np.percentile(video, 30, axis=0) < low, top_right=False)
        outside = _outside(mean < low) | front
        return cls(air, _local_level(mean, tissue, air), outside, per_frame / np.median(per_frame), saturated)

    def normalise(self, frame: np.ndarray, t: int) -> np.ndarray:
        """Frame in units where air is 0 and the local tissue level is 1, after a light denoise."""
        frame = ndimage.gaussian_filter(frame, 0.6) / self.frame_level[t]
        return (frame - self.air) / (self.tissue_map - self.air)


def _local_level(mean: np.ndarray, tissue: np.ndarray, air: float) -> np.ndarray:
    """Tissue intensity around each pixel: the mean of nearby tissue pixels (normalised
    convolution), small-scale so a dim pharyngeal wall is not judged against the bright tongue."""
    sigma = max(mean.shape) / 20
    weight = ndimage.gaussian_filter(tissue.astype(np.float32), sigma)
    total = ndimage.gaussian_filter(np.where(tissue, mean, 0).astype(np.float32), sigma)
    typical = float(np.median(mean[tissue]))
    level = (total + 0.05 * typical) / (weight + 0.05)  # far from tissue: fall back to the typical level
    return np.maximum(level, air + 0.25 * (typical - air))


def _outside(dark: np.ndarray, top_right: bool = True) -> np.ndarray:
    """Air connected to the left, top or right border: outside the head. The airway leaves the
    image only at the bottom (the pharynx continues below)."""
    seeds = ndimage.binary_opening(dark, _CROSS, iterations=1)  # cut thin bridges (noise, parted lips)
    labels, _ = ndimage.label(seeds, _CROSS)
    edges = np.concatenate([labels[:, 0]] + ([labels[0], labels[:, -1]] if top_right else []))
    outside = np.isin(labels, np.unique(edges[edges > 0]))
    # Grow the outside back over the boundary pixels the opening removed, but not along thin gaps.
    return ndimage.binary_dilation(outside, _SQUARE, iterations=1) & dark


def _dark_inside_head(norm: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """Air pixels (below the air/tissue midpoint: the partial-volume boundary) inside the head."""
    return (norm < 0.5) & ~outside


def _airway_region(raw: np.ndarray) -> np.ndarray:
    """Where the airway lies in this video: the main region of pixels often dark inside the head,
    preferring one that reaches the bottom edge (the pharynx continues below), trimmed to the
    passage from the lips to the larynx."""
    often = raw.mean(axis=0) >= 0.2  # the oral airway closes often in speech: a low bar
    opened = ndimage.binary_opening(often, _CROSS)  # detach one-pixel lines (bone edges, skin folds)
    labels, count = ndimage.label(opened, _SQUARE)
    if count == 0:
        return np.zeros(raw.shape[1:], bool)
    sizes = ndimage.sum(opened, labels, index=np.arange(1, count + 1))
    at_bottom = np.isin(np.arange(1, count + 1), labels[-3:])
    best = labels == 1 + int(np.argmax(sizes * np.where(at_bottom, 2.0, 1.0)))
    # Give back the thin ends the opening took (the airway narrows behind the lips); dead ends
    # that come back with them are trimmed by the passage.
    best = ndimage.binary_dilation(best, _SQUARE, iterations=6, mask=often)
    return ndimage.binary_dilation(_passage(best), _SQUARE, iterations=2)


def _passage(region: np.ndarray) -> np.ndarray:
    """The part of `region` on near-shortest paths from its front (leftmost, behind the lips) to
    its bottom (the larynx): the vocal tract, without dead ends such as air in the sinuses."""
    ys, xs = np.nonzero(region)
    cost = np.where(region, 1.0, np.inf)
    bottom = np.argwhere(region & (np.arange(region.shape[0]) == ys.max())[:, None])
    front = np.argwhere(region & (np.arange(region.shape[1]) == xs.min())[None, :])
    through = MCP_Geometric(cost).find_costs(bottom)[0] + MCP_Geometric(cost).find_costs(front)[0]
    shortest = float(through[region].min())
    return region & (through <= shortest + max(4.0, 0.25 * shortest))


def _in_region(mask: np.ndarray, region: np.ndarray) -> np.ndarray:
    """A frame's air within the video's airway region, with pinholes (noise) closed."""
    kept = mask & region
    return ndimage.binary_fill_holes(ndimage.binary_closing(kept, _CROSS) | kept)


def _temporal_median(raw: np.ndarray, window: int) -> np.ndarray:
    window = max(1, int(window) | 1)  # an even window has no median frame: use the next odd
    if window == 1 or len(raw) == 1:
        return raw.astype(np.uint8)
    return ndimage.median_filter(raw.astype(np.uint8), size=(window, 1, 1), mode="nearest")


def _confidence(video: np.ndarray, raw: np.ndarray, smooth: np.ndarray, levels: _VideoLevels) -> np.ndarray:
    """Per frame, in [0, 1]: contrast x agreement x area plausibility x brightness, combined so
    that any one failing pulls the whole confidence down."""
    n = len(video)
    areas = raw.sum(axis=(1, 2)).astype(np.float64)
    typical_area = max(float(np.median(areas)), 1.0)
    out = np.zeros(n, np.float32)
    for t in range(n):
        if not smooth[t].any():
            continue
        contrast = _contrast(levels.normalise(video[t], t), smooth[t].astype(bool))
        agreement = float(np.mean([_dice(raw[t], raw[k]) for k in (t - 1, t + 1) if 0 <= k < n] or [1.0]))
        area = float(np.exp(-abs(np.log(max(areas[t], 1.0) / typical_area))))
        brightness = float(np.exp(-np.log(levels.frame_level[t]) ** 2 / (2 * 0.25**2)))
        saturation = float(np.clip(1 - (levels.saturated[t] - np.median(levels.saturated)) / 0.02, 0, 1))
        quality = (contrast * agreement * area) ** (1 / 3)
        out[t] = quality * brightness * saturation
    return np.clip(out, 0, 1)


def _contrast(norm: np.ndarray, mask: np.ndarray) -> float:
    """How much darker the airway is than the tissue around it, in air-to-tissue units."""
    ring = ndimage.binary_dilation(mask, _SQUARE, iterations=2) & ~mask
    if not ring.any():
        return 0.0
    return float(np.clip((np.median(norm[ring]) - np.median(norm[mask])) / 0.6, 0, 1))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; 1 when both are empty."""
    return _dice(np.asarray(pred, bool), np.asarray(truth, bool))


def write_labelled_video(
    store: CaseStore, case_id: str, attrs: dict, masks: np.ndarray, confidence: np.ndarray, warmup: int,
    min_confidence: float,
) -> np.ndarray:
    """Write one video's (T, 1, H, W) masks, (T,) confidence and the `keep` flags training reads
    (past warm-up and confident enough); returns keep."""
    keep = (np.arange(len(masks)) >= warmup) & (confidence >= min_confidence)
    store.write_case(case_id, attrs, {"mask": masks, "confidence": confidence, "keep": keep.astype(np.uint8)})
    return keep


def pseudolabel_store(images: CaseStore, out: Path, cfg: PseudolabelConfig) -> CaseStore:
    """Pseudo-label every video of an ingest store into a new store at `out` (written atomically).

    Per case: the ingest attrs, `mask` (T, 1, H, W) uint8, `confidence` (T,) float32 and `keep`
    (T,) uint8, 1 where the frame is past warm-up and confident enough to train on. Its quality
    is summarised by segpipe.pseudolabel_report.
    """
    with atomic_dir(Path(out), Owner("labels", images.attrs.get("dataset", "unknown"))) as tmp:
        store = CaseStore.create(
            tmp, dataset=images.attrs.get("dataset", "unknown"), classes=CLASSES, origin="pseudolabel",
            pseudolabel=cfg.model_dump(),
        )
        for case_id in images.case_ids():
            attrs = images.case_attrs(case_id)
            if attrs.get("kind") != VIDEO:
                log.warning("%s: case %s is not a video, not pseudo-labelled", images.path, case_id)
                continue
            frames = images.read(case_id, "image")
            warmup = min(int(attrs.get("warmup_frames", 0)), len(frames))
            masks, confidence = label_video(frames, warmup, cfg)
            keep = write_labelled_video(store, case_id, attrs, masks[:, None], confidence, warmup, cfg.min_confidence)
            log.info("%s: %d/%d frames kept, mean confidence %.2f", case_id, keep.sum(), len(frames),
                     float(np.mean(confidence[warmup:])) if len(frames) > warmup else 0.0)
    return CaseStore(out)
