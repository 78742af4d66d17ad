"""Raw USC files written as the releases store them (AVI, MPEG-4, the reconstructions' HDF5), and
frames whose orientation a transpose visibly changes, for the reader and ingest tests."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import h5py
import numpy as np
from av.video.reformatter import ColorRange


def write_avi(path: Path, frames: np.ndarray, fps: float = 23.18) -> None:
    """Uncompressed BGR24 AVI of grey frames, as the USC-TIMIT release stores them."""
    write_video(path, frames, fps, "rawvideo", "bgr24")


def write_mp4(path: Path, frames: np.ndarray, fps: float = 83.28) -> None:
    """MPEG-4 video of grey frames (lossy), as the USC 75-speaker release stores them: the grey
    values are the luma plane, full range and untagged."""
    write_video(path, frames, fps, "mpeg4", "yuv420p")


def write_video(path: Path, frames: np.ndarray, fps: float, codec: str, pix_fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:  # the container format follows the suffix
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for grey in frames:
            # Full range in and out: a YUV luma plane then holds the grey values, not 16-235.
            frame = av.VideoFrame.from_ndarray(grey, format="gray").reformat(
                format=pix_fmt, src_color_range=ColorRange.JPEG, dst_color_range=ColorRange.JPEG)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_recon(path: Path, data: np.ndarray, name: str = "recon") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=data)


def vocal_tract(n: int = 10, size: int = 32) -> np.ndarray:
    """Frames that a transpose changes: bright on the left, a dark passage along the top right."""
    y, x = np.mgrid[:size, :size]
    frame = 200 - 4 * x + 30 * np.sin(y / 3)
    frame[2:6, size // 2:] = 20
    moving = [np.roll(frame, t % 3, axis=0) for t in range(n)]
    return np.clip(moving, 0, 255).astype(np.uint8)
