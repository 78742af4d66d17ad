"""Training samples: frames and masks read from the Zarr stores, at the model's scale."""
from __future__ import annotations

import numpy as np
import torch

from segpipe.preprocess import frames_to_input, masks_to_target, resize
from segpipe.store import CaseStore, frames_of


def labelled_frames(labels: CaseStore, case_id: str) -> np.ndarray:
    """Indices of the frames of a case that carry a trusted label (all, unless a `keep` array says otherwise)."""
    if labels.has(case_id, "keep"):
        return np.flatnonzero(labels.array(case_id, "keep")[:])
    return np.arange(labels.array(case_id, "mask").shape[0] if labels.is_video(case_id) else 1)


def load_samples(
    images: CaseStore, labels: CaseStore, case_ids: list[str], image_size: tuple[int, int], in_channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack every labelled frame of the cases: x (N, in_channels, h, w), y (N, K, h, w).

    One case is read at a time, so memory holds the resized dataset plus one full-size case.
    """
    xs, ys = [], []
    for case_id in case_ids:
        video = images.is_video(case_id)
        keep = labelled_frames(labels, case_id)
        if keep.size == 0:
            continue
        frames = frames_of(images.array(case_id, "image")[:], video)[keep]
        masks = frames_of(labels.array(case_id, "mask")[:], video)[keep]
        xs.append(resize(frames_to_input(frames, in_channels), image_size))
        ys.append(masks_to_target(masks, image_size))
    if not xs:
        raise ValueError(f"no labelled frames in cases {case_ids[:5]}...")
    return torch.cat(xs), torch.cat(ys)
