"""Real-time speech MRI videos, in either official layout, both accepted under one raw folder:

    USC-TIMIT            <SPK>/mri/*.avi           (uncompressed BGR24, gray content)
    USC 75-speaker       subXXX/2drt/video/*.mp4   (MPEG-4, with an audio stream that is ignored)

Frames are stored as coded: the MPEG-4 videos' luma plane untouched (they carry no range tag, and
reading them as TV range, 16-235, would stretch and clip the real files' 1-253), the AVIs' grey.

A case is one video; its group is the speaker folder. Case ids are the file stem, prefixed with
the speaker when the stem does not already start with it, so two speakers' `clip1` cannot collide.
Other folders beside `mri/`, `2drt/video/` and `2drt/recon/` (audio, raw k-space, tracks) are
ignored; any entry of another kind inside those folders is a stray file, and a video file that
lies anywhere else (a misplaced clip, a folder named `MRI`) is a structural problem, never dropped.

Reconstructions (USC 75-speaker `subXXX/2drt/recon/<clip>_recon.h5`, when present): the release's
float images that its 8-bit MPEG-4 videos were rendered from, matched to the video of the same
clip (`<clip>_video.mp4`) and stored beside its frames as the array `recon`, float32 (T, H, W),
with `recon_frames` in the case attrs; the pipeline itself segments the video frames. The release
writes them from MATLAB, which stores arrays column-major, so read in C order a frame may come out
transposed: of the two orientations, the one whose mean frame correlates best with the video's is
taken (`recon_transposed`, `recon_match`), and a reconstruction that resembles its video in
neither is rejected. A reconstruction without its video is a structural problem, never dropped.

Warm-up: acquisitions start before the magnetisation reaches steady state, so the first frames
are brighter and decay over tens of frames. They are flagged, never dropped: `warmup_frames` is
the length of the leading run of frames whose mean intensity exceeds WARMUP_RATIO x the median
frame mean of the second half of the video (the steady state).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import av
import h5py
import numpy as np
from av.video.reformatter import ColorRange

from segpipe.datasets import CaseData, RawCase, Scan, require_dir, split_by_suffix, visible
from segpipe.errors import IngestError

CLASSES = ["airway"]
LAYOUTS = {"mri": {".avi"}, "2drt/video": {".mp4"}}  # per-speaker subfolder -> video suffixes
WARMUP_RATIO = 1.25
RECONS = {"2drt/video": "2drt/recon"}  # video subfolder -> its reconstructions' subfolder
RECON_DATASET = "recon"  # the dataset in each .h5 (the release's MATLAB scripts read /recon)
MIN_RECON_MATCH = 0.5  # least correlation of a reconstruction's mean frame with its video's
# Suffixes (lower case) of files that are videos wherever they lie, so must lie where a layout reads them.
VIDEO_SUFFIXES = {".avi", ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv"}


def scan(raw: Path) -> Scan:
    cases: list[RawCase] = []
    problems: list[IngestError] = []
    for speaker in visible(require_dir(raw)):
        for sub, suffixes in LAYOUTS.items():
            folder = speaker / sub
            recons = _recons(speaker / RECONS[sub], problems) if sub in RECONS else {}
            if folder.is_dir():
                videos, stray = split_by_suffix(folder, suffixes)
                problems += stray
                if sub in RECONS:  # a reconstruction must find one video, not one of two
                    videos = _by_clip(videos, "video", problems)
                cases += [_case(speaker.name, path, recons.pop(clip_name(path), None))
                          for _, path in sorted(videos.items())]
            problems += [IngestError(path, f"reconstruction without its video (no video of clip {name!r} "
                                           f"in {speaker.name}/{sub}/)") for name, path in sorted(recons.items())]
    problems += [_unread_video(raw, path) for path in _videos_outside(raw, _read_folders(raw))]
    if not cases and not problems:
        problems.append(IngestError(raw, f"no videos found under <speaker>/{{{','.join(LAYOUTS)}}}/"))
    return Scan(sorted(cases, key=lambda c: c.case_id), problems)


def list_cases(raw: Path) -> list[RawCase]:
    return scan(raw).strict()


def single_case(path: Path) -> RawCase:
    """One video file on its own (no speaker folder: the clip is its own group)."""
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise IngestError(path, f"not a video: expected one of {sorted(VIDEO_SUFFIXES)}")
    return RawCase(case_id=path.stem, group=path.stem, source=path)


def load_case(case: RawCase) -> CaseData:
    frames, times, fps = _decode(case.source)
    image = np.stack(frames)
    data = CaseData(
        image=image,
        mask=None,
        attrs={"kind": "video", "fps": fps, "n_frames": len(frames), "warmup_frames": warmup_frames(image)},
        arrays={"timestamps": np.asarray(times, dtype=np.float64)},
    )
    if "recon" in case.extras:
        data.arrays["recon"], recon_attrs = read_recon(case.extras["recon"], image)
        data.attrs.update(recon_attrs)
    return data


decode_case = load_case  # load_case decodes every file already


def clip_name(path: Path) -> str:
    """What a clip's video and reconstruction have in common: the stem less `_video`/`_recon`."""
    for suffix in ("_video", "_recon"):
        if path.stem.lower().endswith(suffix):
            return path.stem[: -len(suffix)]
    return path.stem


def read_recon(path: Path, video: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """A reconstruction as float32 (T, H, W) in its video's orientation, and what was found (see
    the module doc); `video` is that clip's (T', H, W) frames (T' may differ from T)."""
    recon = _recon_dataset(path)
    target = video.mean(axis=0)
    fits = [(transposed, frames) for transposed, frames in ((False, recon), (True, recon.transpose(0, 2, 1)))
            if frames.shape[1:] == target.shape]
    if not fits:
        raise IngestError(path, f"frames of {recon.shape[1]}x{recon.shape[2]} px, its video's are "
                                f"{target.shape[0]}x{target.shape[1]}")
    match, transposed, frames = max(((_correlation(frames.mean(axis=0), target), transposed, frames)
                                     for transposed, frames in fits), key=lambda fit: fit[0])
    if match < MIN_RECON_MATCH:
        raise IngestError(path, f"does not match its video: its mean frame correlates {match:.2f} with the "
                                f"video's (at least {MIN_RECON_MATCH} expected), as stored or transposed")
    attrs = {"recon_frames": len(frames), "recon_transposed": transposed, "recon_match": round(match, 3)}
    return np.ascontiguousarray(frames, dtype=np.float32), attrs


def _recon_dataset(path: Path) -> np.ndarray:
    try:
        with h5py.File(path, "r") as f:
            if f.get(RECON_DATASET, getlink=True) is None:
                raise IngestError(path, f"no {RECON_DATASET!r} dataset (found: {sorted(f)})")
            dataset = f[RECON_DATASET]  # KeyError where the link does not resolve
            if not isinstance(dataset, h5py.Dataset):
                raise IngestError(path, f"{RECON_DATASET!r} is a {type(dataset).__name__.lower()}, expected "
                                        "(frames, height, width) images")
            if dataset.shape is None:
                raise IngestError(path, f"{RECON_DATASET!r} is an empty dataset")
            recon = dataset[()]
    # What h5py raises on a damaged file depends on where the damage is: a cut file gives OSError,
    # a corrupt heap or B-tree RuntimeError, a corrupt datatype ValueError.
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise IngestError(path, f"corrupt or unreadable HDF5 file: {exc}") from exc
    real = np.issubdtype(recon.dtype, np.floating) or np.issubdtype(recon.dtype, np.integer)
    if recon.ndim != 3 or not real or not recon.size:
        raise IngestError(path, f"{RECON_DATASET!r} is {recon.dtype} {recon.shape}, expected real "
                                "(frames, height, width) images")
    if not np.isfinite(recon).all():
        raise IngestError(path, f"{RECON_DATASET!r} holds NaN or infinite values")
    return recon


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two images; 0 where either is flat (nothing to compare)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / norm) if norm > 0 else 0.0


def _recons(folder: Path, problems: list[IngestError]) -> dict[str, Path]:
    """A speaker's reconstructions by clip name; stray entries go to `problems`."""
    if not folder.is_dir():
        return {}
    files, stray = split_by_suffix(folder, {".h5"})
    problems += stray
    return _by_clip(files, "reconstruction", problems)


def _read_folders(raw: Path) -> set[Path]:
    """The folders the layout rules read: every entry there is already a case or a problem."""
    return {speaker / sub for speaker in visible(raw) for sub in (*LAYOUTS, *RECONS.values())}


def _videos_outside(raw: Path, read: set[Path]) -> list[Path]:
    """Video files (by suffix) under `raw` outside the folders read. Only names are looked at, so a
    full copy's thousands of audio, EMA and k-space files cost little."""
    found = []
    for folder, subfolders, files in os.walk(raw):
        if Path(folder) in read:
            subfolders.clear()  # what lies there is already reported
            continue
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]  # as `visible`
        found += [Path(folder, name) for name in files
                  if not name.startswith(".") and Path(name).suffix.lower() in VIDEO_SUFFIXES]
    return sorted(found)


def _unread_video(raw: Path, path: Path) -> IngestError:
    expected = " or ".join(f"<speaker>/{sub}/*{suffix}" for sub, suffixes in LAYOUTS.items()
                           for suffix in sorted(suffixes))
    sub = path.parent.relative_to(raw).as_posix().partition("/")[2]
    wrong_case = sub != sub.lower() and sub.lower() in LAYOUTS
    case_hint = f" (folder names are case-sensitive: {sub!r} should be {sub.lower()!r})" if wrong_case else ""
    return IngestError(path, f"video where no layout reads it{case_hint}: expected {expected}")


def _by_clip(files: dict[str, Path], what: str, problems: list[IngestError]) -> dict[str, Path]:
    """Files by clip name (clip_name); a second file of a clip goes to `problems`."""
    clips: dict[str, Path] = {}
    for path in files.values():
        name = clip_name(path)
        if name in clips:
            problems.append(IngestError(path, f"a second {what} of clip {name!r} (also {clips[name].name})"))
        else:
            clips[name] = path
    return clips


def warmup_frames(video: np.ndarray) -> int:
    """Number of leading frames brighter than WARMUP_RATIO x the steady state (see module doc)."""
    means = video.reshape(len(video), -1).mean(axis=1)
    steady = np.median(means[len(means) // 2 :])
    bright = means > WARMUP_RATIO * steady
    return len(bright) if bright.all() else int(np.argmin(bright))


def _case(speaker: str, path: Path, recon: Path | None) -> RawCase:
    stem = path.stem
    case_id = stem if stem.lower().startswith(speaker.lower()) else f"{speaker}_{stem}"
    return RawCase(case_id=case_id, group=speaker, source=path, extras={"recon": recon} if recon else {})


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
                frames.append(luma(frame))
            expected = stream.frames
    except av.FFmpegError as exc:
        raise IngestError(path, f"corrupt or undecodable video: {exc}") from exc
    _check_frames(path, frames, expected)
    return frames, times, fps


def luma(frame: av.VideoFrame) -> np.ndarray:
    """A frame's (H, W) uint8 luma as coded (see the module doc)."""
    # Full range in and out: no range conversion of YUV, and a grey RGB pixel keeps its value.
    return frame.reformat(format="gray", src_color_range=ColorRange.JPEG,
                          dst_color_range=ColorRange.JPEG).to_ndarray()


def _check_frames(path: Path, frames: list[np.ndarray], expected: int) -> None:
    if not frames:
        raise IngestError(path, "no decodable frames")
    # A cut-off AVI still decodes, just shorter: the header's frame count is what gives it away.
    if expected and len(frames) < expected:
        raise IngestError(path, f"truncated: decoded {len(frames)} of the {expected} frames in its header")
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise IngestError(path, f"frames change size within the video: {sorted(sizes)}")
