"""Synthetic Kvasir-SEG: colonoscopy-like JPEGs with polyps, in the real raw layout.

Writes `<out>/kvasir/images/<id>.jpg` (RGB), `<out>/kvasir/masks/<id>.jpg` (a 0/255 mask saved
as a 3-channel JPEG, so it carries the same compression noise as the real masks) and
`<out>/kvasir/kavsir_bboxes.json` in the real schema (the real file's spelling, too).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from segpipe.config import KvasirDemo

log = logging.getLogger(__name__)

MUCOSA = np.array([0.82, 0.42, 0.36], np.float32)  # the pinkish red of colon wall under white light


def write(root: Path, cfg: KvasirDemo, seed: int) -> None:
    """Write cfg.n_cases image/mask pairs and their bounding boxes under root/kvasir."""
    out = root / "kvasir"
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    low, high = sorted((cfg.min_size, cfg.max_size))
    boxes = {}
    for i in range(cfg.n_cases):
        rng = np.random.default_rng([seed, 1, i])  # one stream per case: more cases leave these unchanged
        case_id = f"demo{i:04d}"
        width, height = (int(v) for v in rng.integers(low, high + 1, size=2))
        image, blobs = render(rng, height, width)
        mask = np.logical_or.reduce(blobs).astype(np.uint8) * 255
        Image.fromarray(image).save(out / "images" / f"{case_id}.jpg", quality=90)
        Image.fromarray(np.repeat(mask[..., None], 3, axis=2)).save(out / "masks" / f"{case_id}.jpg", quality=75)
        boxes[case_id] = {"height": height, "width": width, "bbox": [_bbox(b) for b in blobs]}
    (out / "kavsir_bboxes.json").write_text(json.dumps(boxes, indent=4) + "\n")
    log.info("kvasir demo: %d cases", cfg.n_cases)


def _bbox(blob: np.ndarray) -> dict:
    ys, xs = np.nonzero(blob)
    return {"label": "polyp", "xmin": int(xs.min()), "ymin": int(ys.min()),
            "xmax": int(xs.max()), "ymax": int(ys.max())}


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth random field in about [-1, 1]: coarse noise upsampled bicubically."""
    coarse = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.BICUBIC))


def render(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """An (H, W, 3) uint8 colonoscopy-like image and the boolean mask of each polyp in it."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    tint = MUCOSA * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    light = 0.78 + 0.15 * _smooth_field(rng, height, width, 5)
    # The lumen: a dark tunnel somewhere in the view; and the light falls off towards the rim.
    lx, ly = rng.uniform(0.15, 0.85, size=2)
    light *= 1 - 0.65 * np.exp(-((x - lx) ** 2 + (y - ly) ** 2) / (2 * rng.uniform(0.08, 0.15) ** 2))
    light *= 1 - 0.45 * ((x - 0.5) ** 2 + (y - 0.5) ** 2) / 0.5
    folds = 0.06 * _smooth_field(rng, height, width, 14)  # mucosal folds and vessels, finer than the light
    rgb = tint * (light + folds)[..., None]

    blobs = _polyp_masks(rng, x, y, height, width)
    for blob_shape in blobs:
        rgb = _paint_polyp(rng, rgb, tint, blob_shape, x, y, height, width)
    for _ in range(int(rng.integers(4, 14))):
        rgb = _specular(rng, rgb, x, y)
    rgb += rng.normal(0, 0.02, rgb.shape).astype(np.float32)
    image = np.clip(rgb * 255, 0, 255).astype(np.uint8)
    _black_corners(image, rng)
    masks = [shape[0] >= 0.5 for shape in blobs]
    return image, masks


def _polyp_masks(rng, x, y, height, width) -> list[tuple[np.ndarray, tuple[float, float, float]]]:
    """One polyp, sometimes two that do not touch: (soft coverage, (centre x, centre y, radius))."""
    aspect = width / height
    count = 2 if rng.random() < 0.2 else 1
    shapes, centres = [], []
    for _ in range(count * 4):  # a few tries to place a second polyp apart from the first
        if len(shapes) == count:
            break
        radius = rng.uniform(0.1, 0.24) if count == 1 else rng.uniform(0.08, 0.14)
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        if any(np.hypot((cx - ox) * aspect, cy - oy) < radius + r + 0.08 for ox, oy, r in centres):
            continue
        dx, dy = (x - cx) * aspect, y - cy
        rho, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
        edge = radius * rng.uniform(0.75, 1.0)
        for k in (2, 3, 4, 5):  # an irregular outline: a few low harmonics on the radius
            edge = edge * (1 + rng.uniform(0, 0.09) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)))
        soft = np.clip((edge - rho) * min(height, width) / 2 + 0.5, 0, 1)  # one-pixel soft edge
        shapes.append((soft, (cx, cy, radius)))
        centres.append((cx, cy, radius))
    return shapes


def _paint_polyp(rng, rgb, tint, shape, x, y, height, width) -> np.ndarray:
    """A polyp: paler, pinker tissue with its own texture, shaded as a dome lit from one side."""
    soft, (cx, cy, radius) = shape
    aspect = width / height
    colour = tint * np.array([rng.uniform(1.0, 1.12), rng.uniform(1.0, 1.3), rng.uniform(1.05, 1.35)], np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    lx, ly = cx + 0.5 * radius * np.cos(angle) / aspect, cy + 0.5 * radius * np.sin(angle)
    dome = 0.75 + 0.35 * np.exp(-(((x - lx) * aspect) ** 2 + (y - ly) ** 2) / (2 * (0.7 * radius) ** 2))
    texture = 1 + 0.08 * _smooth_field(rng, height, width, 30)
    polyp = colour * (dome * texture)[..., None]
    # A shadow just outside the edge, on the side away from the light: the polyp stands out.
    rho = np.hypot((x - cx) * aspect, y - cy)
    shade = np.exp(-(((x - (2 * cx - lx)) * aspect) ** 2 + (y - (2 * cy - ly)) ** 2) / (2 * radius**2))
    shadow = 1 - 0.3 * shade * np.clip((1.5 * radius - rho) / (0.5 * radius), 0, 1)
    alpha = soft[..., None]
    return rgb * (1 - alpha) * shadow[..., None] + polyp * alpha


def _specular(rng, rgb, x, y) -> np.ndarray:
    """A specular highlight: a small saturated white ellipse with a soft halo."""
    cx, cy = rng.uniform(0.05, 0.95, size=2)
    sx, sy = rng.uniform(0.004, 0.025, size=2)
    spot = np.exp(-((x - cx) ** 2 / (2 * sx**2) + (y - cy) ** 2 / (2 * sy**2)))
    return rgb + (1.2 - rgb) * np.clip(1.5 * spot, 0, 1)[..., None]


def _black_corners(image: np.ndarray, rng: np.random.Generator) -> None:
    """Cut the corners black, as the endoscope's octagonal field of view does in real frames."""
    height, width = image.shape[:2]
    cut = int(min(height, width) * rng.uniform(0.08, 0.14))
    y, x = np.mgrid[0:height, 0:width]
    corner = (x + y < cut) | ((width - 1 - x) + y < cut) | (x + (height - 1 - y) < cut)
    corner |= (width - 1 - x) + (height - 1 - y) < cut
    image[corner] = 0
