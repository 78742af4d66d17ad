"""Inference: each frame at the model's scale through MONAI's sliding window, probabilities
resized back to the case's original size and written to a Zarr store as float16."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from segpipe.atomic import atomic_dir
from segpipe.config import InferConfig
from segpipe.preprocess import frames_to_input, resize, to_float16
from segpipe.store import CaseStore, frames_of

log = logging.getLogger(__name__)

PROB_STEPS = 1024
CASE_ATTRS = ("group", "kind", "original_size", "fps", "warmup_frames")


@torch.no_grad()
def predict_frames(
    model: nn.Module,
    frames: np.ndarray,
    meta: dict[str, Any],
    cfg: InferConfig,
    device: torch.device,
    channels_per_step: int = 8,
) -> np.ndarray:
    """(T, H, W[, C]) frames -> (T, K, H, W) float16 sigmoid probabilities at the frames' size."""
    size = tuple(meta["image_size"])
    out = np.empty((len(frames), len(meta["classes"])) + frames.shape[1:3], dtype=np.float16)
    for start in range(0, len(frames), cfg.batch_size):
        x = resize(frames_to_input(frames[start : start + cfg.batch_size], meta["in_channels"]), size)
        logits = sliding_window_inference(
            x.to(device), roi_size=size, sw_batch_size=cfg.batch_size, predictor=model,
            overlap=cfg.overlap, mode=cfg.mode,
        ).cpu()
        # Back to full size a few classes at a time: 29 float32 channels at 2048^2 would be ~0.5 GB.
        for c in range(0, logits.shape[1], channels_per_step):
            probs = torch.sigmoid(resize(logits[:, c : c + channels_per_step], frames.shape[1:3]))
            # Rounded to 1/1024 (within float16's own step near 1): the many exact 0s and 1s
            # then compress ~10x, where float16 noise in the low bits did not compress at all.
            probs = torch.round(probs * PROB_STEPS) / PROB_STEPS
            out[start : start + len(x), c : c + channels_per_step] = to_float16(probs)
    return out


def predict_store(
    model: nn.Module,
    meta: dict[str, Any],
    images: CaseStore,
    case_ids: list[str],
    out: Path,
    cfg: InferConfig,
    device: torch.device,
) -> None:
    """Predict every case into a new store at `out` (written atomically), same case keys as `images`."""
    model.eval()
    with atomic_dir(out) as tmp:
        store = CaseStore.create(tmp, dataset=images.attrs["dataset"], classes=meta["classes"], model=meta)
        for case_id in case_ids:
            video = images.is_video(case_id)
            probs = predict_frames(model, frames_of(images.array(case_id, "image")[:], video), meta, cfg, device)
            attrs = images.case_attrs(case_id)
            store.write_case(case_id, {k: attrs[k] for k in CASE_ATTRS if k in attrs})
            store.write_array(case_id, "prob", probs if video else probs[0])
            log.info("predicted %s %s", case_id, probs.shape)
