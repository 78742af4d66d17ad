"""Evaluation: predicted masks against reference masks, at each case's original resolution."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from segpipe.metrics import METRICS, confusion, scores, summarize
from segpipe.store import CaseStore, frames_of, labelled_frames


def score_pairs(pairs: Iterable[tuple[np.ndarray, np.ndarray]], classes: list[str]) -> dict:
    """Summarise metrics over (prediction, reference) pairs of (N, K, H, W) binary frames."""
    per_sample: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for pred, ref in pairs:
        for name, value in scores(confusion(pred, ref)).items():
            per_sample[name].append(value)
    if not per_sample["dice"]:
        raise ValueError("nothing to evaluate: no labelled test frames")
    return summarize({m: np.concatenate(v) for m, v in per_sample.items()}, classes)


def pairs_vs_store(pred: CaseStore, reference: CaseStore, case_ids: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Predicted and reference masks of the labelled frames of each case."""
    for case_id in case_ids:
        video = reference.is_video(case_id)
        keep = labelled_frames(reference, case_id)
        yield (
            frames_of(pred.read(case_id, "mask"), video)[keep],
            frames_of(reference.read(case_id, "mask"), video)[keep],
        )


def pairs_vs_truth(
    pred: CaseStore, images: CaseStore, case_ids: list[str], truth: Path
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Predicted video masks against true masks kept aside as `<truth>/<group>/<case_id>.npy` (T, H, W).

    Warm-up frames are left out: they carry no usable image, so no prediction is expected there.
    """
    for case_id in case_ids:
        attrs = images.case_attrs(case_id)
        true = np.load(truth / attrs["group"] / f"{case_id}.npy")[:, None]
        start = int(attrs.get("warmup_frames", 0))
        yield pred.read(case_id, "mask")[start:], true[start:]
