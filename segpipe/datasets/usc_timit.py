"""Real-time speech MRI videos, in either official layout, both accepted under one raw folder:

    USC-TIMIT            <SPK>/mri/*.avi           (uncompressed BGR24, gray content)
    USC 75-speaker       subXXX/2drt/video/*.mp4   (MPEG-4, with an audio stream that is ignored)

A case is one video; its group is the speaker folder. Case ids are the file stem, prefixed with
the speaker when the stem does not already start with it, so two speakers' `clip1` cannot collide.
Other folders beside `mri/` or `2drt/video/` (audio, tracks, reconstructions) are ignored; any
non-video entry inside those folders is a stray file.

Warm-up: acquisitions start before the magnetisation reaches steady state, so the first frames
are brighter and decay over tens of frames. They are flagged, never dropped: `warmup_frames` is
the length of the leading run of frames whose mean intensity exceeds WARMUP_RATIO x the median
frame mean of the second half of the video (the steady state).
"""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from segpipe.datasets import CaseData, RawCase, Scan, require_dir, split_by_suffix, visible
from segpipe.errors import IngestError

CLASSES = ["airway"]
LAYOUTS = {"mri": {".avi"}, "2drt/video": {".mp4"}}  # per-speaker subfolder -> video suffixes
WARMUP_RATIO = 1.25


def scan(raw: Path) -> Scan:
    cases: list[RawCase] = []
    problems: list[IngestError] = []
    for speaker in visible(require_dir(raw)):
        for sub, suffixes in LAYOUTS.items():
            folder = speaker / sub
            if not folder.is_dir():
                continue
            videos, stray = split_by_suffix(folder, suffixes)
            problems += stray
            cases += [_case(speaker.name, path) for _, path in sorted(videos.items())]
    if not cases and not problems:
        problems.append(IngestError(raw, f"no videos found under <speaker>/{{{','.join(LAYOUTS)}}}/"))
    return Scan(sorted(cases, key=lambda c: c.case_id), problems)


def list_cases(raw: Path) -> list[RawCase]:
    return scan(raw).strict()


def load_case(case: RawCase) -> CaseData:
    frames, times, fps = _decode(case.source)
    image = np.stack(frames)
    return CaseData(
        image=image,
        mask=None,
        attrs={"kind": "video", "fps": fps, "n_frames": len(frames), "warmup_frames": warmup_frames(image)},
        arrays={"timestamps": np.asarray(times, dtype=np.float64)},
    )


def warmup_frames(video: np.ndarray) -> int:
    """Number of leading frames brighter than WARMUP_RATIO x the steady state (see module doc)."""
    means = video.reshape(len(video), -1).mean(axis=1)
    steady = np.median(means[len(means) // 2 :])
    bright = means > WARMUP_RATIO * steady
    return len(bright) if bright.all() else int(np.argmin(bright))


def _case(speaker: str, path: Path) -> RawCase:
    stem = path.stem
    case_id = stem if stem.lower().startswith(speaker.lower()) else f"{speaker}_{stem}"
    return RawCase(case_id=case_id, group=speaker, source=path)


def _decode(path: Path) -> tuple[list[np.ndarray], list[float], float]:
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise IngestError(path, "no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            if fps <= 0:
                raise IngestError(path, "no frame rate in the stream header")
            frames, times = [], []
            for frame in container.decode(stream):
                times.append(frame.time if frame.time is not None else len(frames) / fps)
                frames.append(frame.to_ndarray(format="gray"))
            expected = stream.frames
    except av.FFmpegError as exc:
        raise IngestError(path, f"corrupt or undecodable video: {exc}") from exc
    _check_frames(path, frames, expected)
    return frames, times, fps


def _check_frames(path: Path, frames: list[np.ndarray], expected: int) -> None:
    if not frames:
        raise IngestError(path, "no decodable frames")
    # A cut-off AVI still decodes, just shorter: the header's frame count is what gives it away.
    if expected and len(frames) < expected:
        raise IngestError(path, f"truncated: decoded {len(frames)} of the {expected} frames in its header")
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise IngestError(path, f"frames change size within the video: {sorted(sizes)}")
