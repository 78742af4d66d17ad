"""Evaluation: predicted masks against reference masks at each case's original resolution, per
labelled frame (an image is one frame) and class: the overlap metrics of segpipe.metrics, the
boundary metrics of segpipe.boundary_metrics, and, per case, which class was predicted where a
true class was missed.

Memory stays flat on a 2048 px, 29-class hand: masks are read in bands of rows (all classes of a
band: a prediction store keeps them in one chunk), counted, and kept bit-packed (15 MB for the whole
hand instead of 121 MB), then unpacked one class at a time for the boundary metrics, which need
the whole frame. A video is read a batch of frames at a time.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.boundary_metrics import BOUNDARY_METRICS, boundary_scores
from segpipe.errors import StoreError
from segpipe.metrics import confusion, scores, summarize
from segpipe.progress import tracked
from segpipe.store import CaseStore, labelled_frames

BAND_ROWS = 512  # rows of an image read at once: 29 classes x 512 x 2048 px of float16 are 61 MB
BATCH_FRAMES = 16  # frames of a video read at once


@dataclass(frozen=True)
class CaseMasks:
    """A case's binary masks, (T, K, H, W) for a video or (K, H, W) for an image, read a block at a
    time from a zarr or numpy array: a `mask` as it is, or a `prob` cut at per-class thresholds
    (compared in float32, as the ensemble cuts its own masks)."""

    array: Any
    video: bool
    thresholds: np.ndarray | None = None

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """(K, H, W) of one frame."""
        return tuple(self.array.shape[-3:])

    @property
    def n_frames(self) -> int:
        return self.array.shape[0] if self.video else 1

    def block(self, start: int, stop: int, rows: slice) -> np.ndarray:
        """Frames start..stop-1 (an image: its one frame), rows `rows`: bool (B, K, h, W)."""
        data = np.asarray(self.array[start:stop, :, rows] if self.video else self.array[:, rows][None])
        if self.thresholds is None:
            return data != 0
        # float16 against float32 thresholds compares in float32 (as the ensemble cuts), value by
        # value: no float32 copy of the band (122 MB for a hand's 29 classes x 512 rows).
        return data >= self.thresholds[None, :, None, None]


def stored_masks(store: CaseStore, case_id: str, thresholds: Sequence[float] | None = None) -> CaseMasks:
    """A case's `mask` array of `store`, or with `thresholds` its `prob` array cut at them."""
    if thresholds is None:
        return CaseMasks(store.array(case_id, "mask"), store.is_video(case_id))
    cut = np.asarray(thresholds, dtype=np.float32)
    return CaseMasks(store.array(case_id, "prob"), store.is_video(case_id), cut)


@dataclass(frozen=True)
class CaseScores:
    """One case's metrics per scored frame and class, and its class confusion."""

    case_id: str
    frames: np.ndarray  # (F,) indices of the frames scored
    values: dict[str, np.ndarray]  # metric name -> (F, K)
    missed_as: np.ndarray  # (K, K + 1): true pixels of each class missed, by the class predicted there (last: none)


def missed_as(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """(K, K + 1) pixel counts of (B, K, h, W) masks: where class A (row) is true and not predicted,
    the classes predicted there instead (columns; a pixel may count for several, as classes overlap),
    and in the last column the pixels where no class is predicted at all."""
    n_classes = pred.shape[1]
    missed = np.moveaxis(ref & ~pred, 1, 0).reshape(n_classes, -1)
    predicted = np.moveaxis(pred, 1, 0).reshape(n_classes, -1)
    out = np.zeros((n_classes, n_classes + 1), dtype=np.int64)
    for a in range(n_classes):
        where = np.flatnonzero(missed[a])  # few pixels: a missed part of one class
        if where.size:
            hit = predicted[:, where]
            out[a, :n_classes] = hit.sum(axis=1)
            out[a, n_classes] = where.size - np.count_nonzero(hit.any(axis=0))
    return out


def frame_batches(frames: np.ndarray, video: bool) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, kept) runs of at most BATCH_FRAMES frames holding the frames to score, `kept`
    their offsets in the run; an image is the one run (0, 1, [0])."""
    span = BATCH_FRAMES if video else 1
    for start in range(0, int(frames.max()) + 1 if frames.size else 0, span):
        kept = frames[(frames >= start) & (frames < start + span)] - start
        if kept.size:
            yield start, start + span, kept


def row_bands(height: int, video: bool) -> list[slice]:
    """The rows read at once: a video's whole frames, an image's BAND_ROWS at a time."""
    if video:
        return [slice(None)]
    return [slice(r, min(r + BAND_ROWS, height)) for r in range(0, height, BAND_ROWS)]


def class_frames(packed: np.ndarray, k: int, width: int) -> np.ndarray:
    """Class k of (B, K, H, W/8) bit-packed masks, unpacked: (B, 1, H, W) bool."""
    return np.unpackbits(packed[:, k : k + 1], axis=-1, count=width).view(bool)


def score_run(pred: CaseMasks, ref: CaseMasks, start: int, stop: int, kept: np.ndarray,
              tolerance: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Metrics (B, K) of the frames `kept` (offsets) of the run start..stop, and their class confusion."""
    n_classes, height, width = ref.frame_shape
    counts = {name: np.zeros((len(kept), n_classes), dtype=np.int64) for name in ("tp", "fp", "fn")}
    packed_shape = (len(kept), n_classes, height, -(-width // 8))
    packed = {side: np.zeros(packed_shape, dtype=np.uint8) for side in ("pred", "ref")}
    confused = np.zeros((n_classes, n_classes + 1), dtype=np.int64)
    for rows in row_bands(height, ref.video):
        p, r = pred.block(start, stop, rows)[kept], ref.block(start, stop, rows)[kept]
        for name, count in confusion(p, r).items():
            counts[name] += count
        confused += missed_as(p, r)
        packed["pred"][:, :, rows], packed["ref"][:, :, rows] = np.packbits(p, axis=-1), np.packbits(r, axis=-1)
    values = scores(counts)
    # Boundary metrics need whole frames: one class at a time, unpacked.
    per_class = [boundary_scores(class_frames(packed["pred"], k, width), class_frames(packed["ref"], k, width),
                                 tolerance) for k in range(n_classes)]
    values.update({name: np.concatenate([b[name] for b in per_class], axis=1) for name in BOUNDARY_METRICS})
    return values, confused


def score_case(case_id: str, pred: CaseMasks, ref: CaseMasks, frames: np.ndarray, tolerance: float) -> CaseScores:
    """Every metric of the frames `frames` of one case, and its class confusion."""
    if pred.frame_shape != ref.frame_shape or pred.n_frames != ref.n_frames:
        raise StoreError(f"case {case_id!r}: predicted masks {pred.array.shape} and reference masks "
                         f"{ref.array.shape} differ in shape")
    n_classes = ref.frame_shape[0]
    runs = [score_run(pred, ref, start, stop, kept, tolerance)
            for start, stop, kept in frame_batches(np.asarray(frames), ref.video)]
    values = {name: np.concatenate([v[name] for v, _ in runs]) for name in runs[0][0]} if runs else {}
    confused = sum((c for _, c in runs), np.zeros((n_classes, n_classes + 1), dtype=np.int64))
    return CaseScores(case_id, np.asarray(frames), values, confused)


def score_store(pred: CaseStore, labels: CaseStore, case_ids: list[str], tolerance: float,
                thresholds: Sequence[float] | None = None, name: str = "ensemble") -> list[CaseScores]:
    """Each case's predicted masks (or `prob` cut at `thresholds`) against the labels, on the
    labelled frames; cases without any are left out."""
    out = []
    for case_id in tracked(case_ids, f"evaluate {pred.attrs.get('dataset')} {name}"):
        frames = labelled_frames(labels, case_id)
        if frames.size:
            out.append(score_case(case_id, stored_masks(pred, case_id, thresholds), stored_masks(labels, case_id),
                                  frames, tolerance))
    return out


def score_vs_truth(pred: CaseStore, images: CaseStore, case_ids: list[str], truth: Path,
                   tolerance: float) -> list[CaseScores]:
    """Predicted video masks against true masks kept aside as `<truth>/<group>/<case_id>.npy` (T, H, W).

    Warm-up frames are left out: they carry no usable image, so no prediction is expected there.
    """
    out = []
    for case_id in case_ids:
        attrs = images.case_attrs(case_id)
        true = np.load(truth / attrs["group"] / f"{case_id}.npy")[:, None]
        frames = np.arange(int(attrs.get("warmup_frames", 0)), len(true))
        out.append(score_case(case_id, stored_masks(pred, case_id), CaseMasks(true, video=True), frames, tolerance))
    return out


@dataclass(frozen=True)
class Evaluation:
    """The ensemble's and each member's scores on the same test cases, and what the report shows
    beside them: the thresholds the ensemble recorded, and the demo's scores against the truth."""

    classes: list[str]
    tolerance: float
    ensemble: list[CaseScores]
    members: dict[str, list[CaseScores]]
    thresholds: dict[str, dict[str, Any]]
    vs_truth: list[CaseScores] | None = None


def member_name(store: CaseStore) -> str:
    """`<arch>-fold<k>` from the checkpoint a member store records, else the store's file name."""
    model = store.attrs.get("model", {})
    if "arch" in model and "fold" in model:
        return f"{model['arch']}-fold{model['fold']}"
    return store.path.stem


def recorded_thresholds(ensemble: CaseStore) -> dict[str, dict[str, Any]]:
    """The per-class thresholds (and how they were chosen) the ensemble stage recorded in its store."""
    recorded = ensemble.attrs.get("thresholds", {})
    missing = [c for c in ensemble.classes if "threshold" not in recorded.get(c, {})]
    if missing:
        raise StoreError(f"{ensemble.path}: no recorded threshold for classes {missing[:5]} (attrs thresholds)")
    return {c: recorded[c] for c in ensemble.classes}


def evaluate_ensemble(ensemble: CaseStore, labels: CaseStore, members: list[CaseStore], case_ids: list[str],
                      tolerance: float) -> Evaluation:
    """Score the ensemble's masks and every member's probabilities on the test cases `case_ids`.

    A member's `prob` is cut at the ensemble's recorded per-class thresholds, so that a member's
    row and the ensemble's differ in the averaging alone, not in the cut.
    """
    for store in (labels, *members):
        if store.classes != ensemble.classes:
            raise StoreError(f"{store.path}: classes {store.classes} differ from {ensemble.classes} in {ensemble.path}")
    thresholds = recorded_thresholds(ensemble)
    cut = [thresholds[c]["threshold"] for c in ensemble.classes]
    return Evaluation(
        classes=ensemble.classes, tolerance=tolerance,
        ensemble=score_store(ensemble, labels, case_ids, tolerance),
        members={member_name(m): score_store(m, labels, case_ids, tolerance, cut, member_name(m)) for m in members},
        thresholds=thresholds,
    )


def summary(cases: list[CaseScores], classes: list[str]) -> dict[str, Any]:
    """Means over every scored frame per class and the mean over classes as the headline (as
    segpipe.metrics.summarize)."""
    if not cases:
        raise ValueError("nothing to evaluate: no labelled test frames")
    return summarize({name: np.concatenate([c.values[name] for c in cases]) for name in cases[0].values}, classes)


def case_means(case: CaseScores) -> dict[str, np.ndarray]:
    """A case's metrics per class (K,): the means over its scored frames."""
    return {name: values.mean(axis=0) for name, values in case.values.items()}
