"""Synthetic USC-TIMIT: mid-sagittal vocal-tract phantom videos in the real raw layout.

Writes `<out>/usc_timit/<SPK>/mri/<SPK>_<n>.avi` (uncompressed BGR24 AVI, grey content in three
equal channels, as the real release) and, outside the raw layout, the true airway masks
`<out>/usc_timit_truth/<SPK>/<stem>.npy` as (T, H, W) uint8 0/1.

The phantom follows the real clips: face on the left, dark air around the head, bright soft
tissue with a bright tongue, and the airway as a dark passage from behind the (closed) lips
under the palate and down the pharynx to the bottom edge. Jaw and tongue move smoothly; the
first frames are over-bright, as an MRI sequence before it reaches steady state.
"""
from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from segpipe.config import UscTimitDemo

log = logging.getLogger(__name__)

SUPERSAMPLE = 3  # drawn finer than the output, then averaged: partial-volume edges as in real MRI
INTENSITY = 170.0  # uint8 value of intensity 1.0 in the phantom's units

# Head outline (normalised x right, y down), clockwise from the top of the forehead. Points with
# y beyond the lips move with the jaw.
HEAD = [(0.27, -0.3), (0.20, 0.10), (0.07, 0.24), (0.15, 0.31), (0.12, 0.38), (0.16, 0.42),
        (0.13, 0.47), (0.18, 0.55), (0.18, 0.62), (0.30, 0.69), (0.47, 0.76), (0.52, 0.86),
        (0.56, 1.3), (1.3, 1.3), (1.3, -0.3)]
# Airway centre line: behind the lips, under the palate, over the tongue, down the pharynx.
AIRWAY = [(0.21, 0.42), (0.30, 0.405), (0.42, 0.385), (0.54, 0.40), (0.63, 0.47), (0.67, 0.58),
          (0.68, 0.72), (0.675, 0.86), (0.67, 1.2)]
JAW_PIVOT = (0.62, 0.33)
LIPS_Y = 0.42


def write(root: Path, cfg: UscTimitDemo, seed: int) -> None:
    """Write every speaker's videos under root/usc_timit and their truths under root/usc_timit_truth."""
    rate = Fraction(cfg.fps).limit_denominator(1000)
    for s in range(cfg.n_speakers):
        speaker = f"{'FM'[s % 2]}{s // 2 + 1}"
        rng = np.random.default_rng([seed, 2, s])
        anatomy = _speaker_anatomy(rng)
        for v in range(cfg.videos_per_speaker):
            stem = f"{speaker}_{v + 1}"
            frames, truth = render_video(anatomy, cfg, np.random.default_rng([seed, 2, s, v]))
            video = root / "usc_timit" / speaker / "mri" / f"{stem}.avi"
            write_avi(video, frames, rate)
            truth_path = root / "usc_timit_truth" / speaker / f"{stem}.npy"
            truth_path.parent.mkdir(parents=True, exist_ok=True)
            np.save(truth_path, truth)
    log.info("usc_timit demo: %d speakers x %d videos", cfg.n_speakers, cfg.videos_per_speaker)


def write_avi(path: Path, frames: np.ndarray, rate: Fraction) -> None:
    """Uncompressed BGR24 AVI of (T, H, W) uint8 grey frames, like the real USC-TIMIT files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("rawvideo", rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "bgr24"
        for grey in frames:
            frame = av.VideoFrame.from_ndarray(np.repeat(grey[..., None], 3, axis=2), format="bgr24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _speaker_anatomy(rng: np.random.Generator) -> dict:
    """What differs between speakers: head pose and size, airway calibre, tissue contrast."""
    return {
        "scale": rng.uniform(0.92, 1.06),
        "angle": np.deg2rad(rng.uniform(-5, 5)),
        "shift": rng.uniform(-0.04, 0.04, size=2),
        "oral": rng.uniform(0.018, 0.026),  # half widths, in image units
        "pharynx": rng.uniform(0.028, 0.038),
        "tissue": rng.uniform(0.42, 0.52),
        "tongue": rng.uniform(0.75, 0.9),
        "noise": rng.uniform(0.05, 0.07),
        "airway": np.asarray(AIRWAY) + rng.uniform(-0.015, 0.015, size=(len(AIRWAY), 2)),
        "coil": rng.uniform(0.3, 0.5, size=2),  # where the receive coil makes the image brightest
    }


def _motion(rng: np.random.Generator, n: int, fps: float) -> np.ndarray:
    """A smooth random signal in [0, 1] per frame: two slow sinusoids, as articulators move."""
    t = np.arange(n) / fps
    freqs = rng.uniform(0.25, 1.0, size=2)
    phases = rng.uniform(0, 2 * np.pi, size=2)
    wave = np.sin(2 * np.pi * freqs[0] * t + phases[0]) + 0.5 * np.sin(2 * np.pi * freqs[1] * t + phases[1])
    return (wave + 1.5) / 3.0


def render_video(anatomy: dict, cfg: UscTimitDemo, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W) uint8 frames and (T, H, W) uint8 0/1 true airway masks of one video."""
    n, size = cfg.n_frames, cfg.size
    jaw, tongue, back = (_motion(rng, n, cfg.fps) for _ in range(3))
    frames = np.empty((n, size, size), np.uint8)
    truth = np.empty((n, size, size), np.uint8)
    for t in range(n):
        clean, airway = _render_frame(anatomy, size, jaw[t], tongue[t], back[t])
        truth[t] = airway
        frames[t] = _acquire(clean, anatomy["noise"], _warmup_gain(t, cfg.warmup_frames), rng)
    return frames, truth


def _warmup_gain(t: int, warmup: int) -> float:
    """Signal gain before steady state: 2.2x at frame 0, decaying towards 1. The last warm-up
    frame is still about 1.4x, so a reader's brightness test finds exactly `warmup` frames."""
    if t >= warmup:
        return 1.0
    return 1.3 + 0.9 * float(np.exp(-3.0 * t / warmup))


def _acquire(clean: np.ndarray, sigma: float, gain: float, rng: np.random.Generator) -> np.ndarray:
    """Rician magnitude noise, a slight blur and 8-bit quantisation, as a magnitude MRI image."""
    level = gain * rng.uniform(0.95, 1.05)  # frame-to-frame signal fluctuation
    real = clean * level + rng.normal(0, sigma, clean.shape)
    imag = rng.normal(0, sigma, clean.shape)
    magnitude = ndimage.gaussian_filter(np.hypot(real, imag), 0.5)
    return np.clip(magnitude * INTENSITY, 0, 255).round().astype(np.uint8)


def _transform(points, anatomy: dict, px: float, jaw_angle: float = 0.0) -> list[tuple[float, float]]:
    """Normalised phantom points -> pixel coordinates of the supersampled canvas."""
    pts = np.asarray(points, float)
    if jaw_angle:  # the jaw swings open around the temporomandibular joint, below the lips only
        below = pts[:, 1] > LIPS_Y
        c, s = np.cos(jaw_angle), np.sin(jaw_angle)
        d = pts[below] - JAW_PIVOT
        pts[below] = JAW_PIVOT + np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], 1)
    c, s = np.cos(anatomy["angle"]), np.sin(anatomy["angle"])
    d = (pts - 0.5) * anatomy["scale"]
    pts = 0.5 + anatomy["shift"] + np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]], 1)
    return [(float(x), float(y)) for x, y in pts * px]


def _dense(points: list[tuple[float, float]], step: float) -> np.ndarray:
    """Resample a polyline at about `step` spacing, so discs along it draw a smooth tube."""
    pts = np.asarray(points)
    seg = np.hypot(*np.diff(pts, axis=0).T)
    along = np.concatenate([[0], np.cumsum(seg)])
    s = np.linspace(0, along[-1], max(int(along[-1] / step), 2))
    return np.stack([np.interp(s, along, pts[:, 0]), np.interp(s, along, pts[:, 1])], 1)


def _render_frame(anatomy: dict, size: int, jaw: float, tongue: float, back: float):
    """Clean phantom intensities (size, size) float and the airway mask (size, size) uint8."""
    px = size * SUPERSAMPLE
    jaw_angle = np.deg2rad(7.0 * jaw)
    canvas = {}
    for name in ("head", "fat", "tongue", "dark", "airway"):
        canvas[name] = Image.new("L", (px, px), 0)
    draw = {k: ImageDraw.Draw(v) for k, v in canvas.items()}

    head = _transform(HEAD, anatomy, px, jaw_angle)
    draw["head"].polygon(head, fill=255)
    draw["fat"].line(head + head[:1], fill=255, width=max(2, px // 40))  # subcutaneous fat shines in MRI

    # Tongue body: a bright ellipse below the oral airway, in front of the pharynx; it rises
    # (narrowing the mouth) and moves back (narrowing the pharynx) with the articulation signals.
    cx, cy = 0.42 - 0.03 * back, 0.55 - 0.03 * tongue + 0.03 * jaw
    box = _transform([(cx - 0.22, cy - 0.14), (cx + 0.2, cy + 0.14)], anatomy, px)
    draw["tongue"].ellipse([box[0], box[1]], fill=255)

    # Dark structures that are NOT the airway: hard palate bone, mandible cortex, a closed
    # nasal-cavity pocket and the vertebrae's gaps, so a labeller has to tell them apart.
    width = max(2, px // 60)
    draw["dark"].line(_transform([(0.24, 0.355), (0.5, 0.345)], anatomy, px), fill=180, width=width)
    draw["dark"].line(_transform([(0.2, 0.6), (0.35, 0.66), (0.5, 0.7)], anatomy, px, jaw_angle), fill=200, width=width)
    draw["dark"].ellipse(_transform([(0.3, 0.28), (0.48, 0.31)], anatomy, px), fill=150)
    for y in np.arange(0.45, 1.0, 0.12):
        draw["dark"].line(_transform([(0.76, y), (0.88, y + 0.01)], anatomy, px), fill=120, width=width)

    # Airway: discs along the centre line, half width varying along it and over time.
    line = _dense(_transform(anatomy["airway"], anatomy, px), step=0.5)
    frac = np.linspace(0, 1, len(line))
    oral = anatomy["oral"] * (0.6 + 1.1 * jaw) * (1.3 - 0.6 * tongue)
    pharynx = anatomy["pharynx"] * (1.25 - 0.5 * back)
    half = np.interp(frac, [0.0, 0.08, 0.45, 0.6, 1.0], [0.5 * oral, oral, oral, pharynx, pharynx * 1.1])
    for (x, y), r in zip(line, half * px * anatomy["scale"]):
        draw["airway"].ellipse([x - r, y - r, x + r, y + r], fill=255)

    a = {k: np.asarray(v, np.float32) / 255.0 for k, v in canvas.items()}
    airway = a["airway"] * a["head"]  # lips closed: no airway outside the head outline
    tissue = anatomy["tissue"] * (1 + 0.5 * a["fat"]) * (1 - 0.8 * a["dark"])
    tissue = tissue + (anatomy["tongue"] - anatomy["tissue"]) * a["tongue"] * (1 - a["dark"])
    clean = tissue * a["head"] * (1 - airway)
    clean = _average(clean, SUPERSAMPLE) * _coil_gain(anatomy["coil"], size)
    mask = (_average(airway, SUPERSAMPLE) >= 0.5).astype(np.uint8)
    return clean, mask


def _coil_gain(centre: np.ndarray, size: int) -> np.ndarray:
    """Smooth receive-coil shading: brightest near the coil, about 30% darker at the far corner."""
    y, x = np.mgrid[0:size, 0:size] / size
    return 1.15 - 0.6 * ((x - centre[0]) ** 2 + (y - centre[1]) ** 2)


def _average(image: np.ndarray, k: int) -> np.ndarray:
    h, w = image.shape[0] // k, image.shape[1] // k
    return image.reshape(h, k, w, k).mean(axis=(1, 3))
