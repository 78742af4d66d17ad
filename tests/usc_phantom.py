"""The demo rtMRI phantom, small, as the pseudo-label and teacher tests share it: demo videos written
as AVI and read back as ingest sees them, with their true airway masks."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from segpipe.config import UscTimitDemo
from segpipe.datasets.usc_timit import luma
from segpipe.store import CaseStore

VIDEOS = UscTimitDemo(n_speakers=2, videos_per_speaker=2, n_frames=24, warmup_frames=3, size=68, fps=23.18)


def decode(path: Path) -> np.ndarray:
    """A video's frames as the reader stores them."""
    with av.open(str(path)) as container:
        return np.stack([luma(f) for f in container.decode(video=0)])


def videos(root: Path):
    """(path, frames, true masks) of every video the phantom fixture wrote under `root`."""
    for path in sorted((root / "usc_timit").glob("*/mri/*.avi")):
        truth = np.load(root / "usc_timit_truth" / path.parent.parent.name / f"{path.stem}.npy")
        yield path, decode(path), truth


def ingest_like_store(path: Path, videos) -> CaseStore:
    store = CaseStore.create(path, dataset="usc_timit", classes=["airway"])
    for video_path, frames, _ in videos:
        speaker = video_path.parent.parent.name
        attrs = {"kind": "video", "group": speaker, "warmup_frames": VIDEOS.warmup_frames,
                 "source": f"{speaker}/mri/{video_path.name}"}
        store.write_case(video_path.stem, attrs)
        store.write_array(video_path.stem, "image", frames)
    return store
