"""Training augmentation with albumentations, built per dataset from `DatasetAugment` (params `augment:`).

Contract for the training loop:

- `build(cfg) -> Augment | None`: None when every probability in `cfg` is 0 (nothing to do).
- `Augment(image, mask, seed) -> (image, mask)`: `image` float32 (H, W, C) in [0, 1], C = 1 or 3; `mask` uint8
  (H, W, K), any K (multi-label channels may overlap). Returns new arrays of the same dtypes and shapes, the
  image still in [0, 1]. Every mask channel gets the image's geometry, resampled nearest-neighbour so it stays
  binary; pixel-only transforms (colour, CLAHE, black corner) leave the masks alone.
- Deterministic per call: the output depends only on the inputs and `seed` (an int >= 0), never on global
  RNG state or earlier calls, so a resumed run that derives the same per-sample seed (run seed, epoch, step)
  sees the same samples. One Augment must not be called from several threads at once; DataLoader workers
  are processes, each with its own copy.

Seeding: the Compose is built once; each call hands it one fresh numpy Generator and one `random.Random`,
shared by all its transforms (`Compose.set_random_state`, ~15 us). `Compose.set_random_seed` is not used:
it seeds every transform with the same seed, so their draws coincide (hflip and vflip at p=0.5 would always
fire together).

Order: geometry first, then intensity, then the black corner, which belongs to the camera frame and so stays
at the lower left whatever the geometry did.
"""
from __future__ import annotations

import random
from typing import Any

import albumentations as A
import cv2
import numpy as np

from segpipe.config import DatasetAugment


class BlackCorner(A.ImageOnlyTransform):
    """Blacks out a box flush with the lower-left corner, like the inset many Kvasir frames carry
    (166 of 300 real frames; 5th-95th percentile 25-46% of the width, 21-40% of the height)."""

    def __init__(self, size: tuple[float, float] = (0.2, 0.45), p: float = 0.5):
        super().__init__(p=p)
        self.size = size

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        box_h, box_w = (round(edge * self.py_random.uniform(*self.size)) for edge in (height, width))
        return {"box_h": box_h, "box_w": box_w}

    def apply(self, img: np.ndarray, box_h: int, box_w: int, **params: Any) -> np.ndarray:
        img = img.copy()
        img[img.shape[0] - box_h:, :box_w] = 0
        return img


def transforms(cfg: DatasetAugment) -> list[A.BasicTransform]:
    """The albumentations transforms `cfg` switches on (probability > 0), in order of application."""
    jitter = (1 - cfg.jitter, 1 + cfg.jitter)
    candidates = [
        (cfg.hflip, lambda p: A.HorizontalFlip(p=p)),
        (cfg.vflip, lambda p: A.VerticalFlip(p=p)),
        (cfg.affine, lambda p: A.Affine(
            scale=cfg.scale, rotate=(-cfg.rotate, cfg.rotate), keep_ratio=True,
            translate_percent=(-cfg.translate, cfg.translate), border_mode=cv2.BORDER_CONSTANT, p=p)),
        (cfg.elastic, lambda p: A.ElasticTransform(
            alpha=cfg.elastic_alpha, sigma=cfg.elastic_sigma, border_mode=cv2.BORDER_CONSTANT, p=p)),
        (cfg.color_jitter, lambda p: in_uint8(A.ColorJitter(
            brightness=jitter, contrast=jitter, saturation=jitter, hue=(-cfg.hue, cfg.hue), p=1.0), p=p)),
        # CLAHE needs uint8: albumentations converts float images to uint8 and back around it.
        (cfg.clahe, lambda p: A.CLAHE(clip_limit=(1.0, cfg.clahe_clip), p=p)),
        (cfg.black_corner, lambda p: BlackCorner(size=cfg.black_corner_size, p=p)),
    ]
    return [make(p) for p, make in candidates if p > 0]


def in_uint8(transform: A.BasicTransform, p: float) -> A.Sequential:
    """`transform` applied to the image rounded to uint8, with probability p. ColorJitter costs ~0.7 ms
    there against ~4 ms on float32 (albucore computes float contrast in float64); the rounding,
    at most 1/510, is below what the 8-bit source images resolve."""
    return A.Sequential([A.FromFloat(max_value=255, dtype="uint8"), transform, A.ToFloat(max_value=255)], p=p)


class Augment:
    """A dataset's augmentation pipeline; see the module docstring for the call contract."""

    def __init__(self, steps: list[A.BasicTransform]):
        # Masks pass as one (H, W, K) array: albumentations 2.0.8 takes any K (it splits past OpenCV's
        # 4-channel limit itself); mask_interpolation makes every geometric step nearest-neighbour.
        self.compose = A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST, p=1.0)

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        _check(image, mask)
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = self.compose(image=image, mask=mask)
        # Flips return views of the input; callers get arrays of their own.
        image_out = np.clip(out["image"], 0.0, 1.0, dtype=np.float32).reshape(image.shape)
        return image_out, np.array(out["mask"], dtype=np.uint8, order="C").reshape(mask.shape)

    def __repr__(self) -> str:
        return f"Augment({self.compose.transforms})"


def build(cfg: DatasetAugment) -> Augment | None:
    """The dataset's augmentation, or None when `cfg` switches nothing on."""
    steps = transforms(cfg)
    return Augment(steps) if steps else None


def _check(image: np.ndarray, mask: np.ndarray) -> None:
    if image.dtype != np.float32 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"augment: image must be float32 (H, W, 1|3), got {image.dtype} {image.shape}")
    if mask.dtype != np.uint8 or mask.ndim != 3 or mask.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"augment: mask must be uint8 (H, W, K) matching the image {image.shape[:2]}, got {mask.dtype} {mask.shape}"
        )
