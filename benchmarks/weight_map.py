"""The U-Net border weight map (segpipe.weightmap) vs the literal formula, measured in this run.

    python -m benchmarks.weight_map [--size 256] [--repeats 5]   (from the repo root)

Prints one JSON line. Two 29-channel masks at size x size:
    hand    the demo generator's 29 bones (segpipe/datasets/demo_hand.py): one object per channel,
            the hand X-ray case
    blobs   every channel a field of ~40 random blobs: a worst case for the border term
Baseline `literal`: the formula as written, a full-image distance transform per object, sorted per
pixel. Ratios: speed_ratio_* = literal time / segpipe time; max_abs_diff_* checks they agree.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from benchmarks.common import emit
from segpipe.datasets.demo_hand import hand_polygons
from segpipe.weightmap import class_balance, weight_map

W0, SIGMA = 10.0, 5.0


def hand_mask(size: int) -> np.ndarray:
    hand = hand_polygons(np.random.default_rng(0), np.ones(5), size, mirror=False)
    channels = []
    for outline in hand.bones.values():
        canvas = Image.new("L", (size, size))
        ImageDraw.Draw(canvas).polygon([tuple(p) for p in outline], fill=1)
        channels.append(np.asarray(canvas))
    return np.stack(channels)


def blob_mask(size: int) -> np.ndarray:
    noise = np.random.default_rng(0).random((29, size, size))
    return (ndimage.gaussian_filter(noise, (0, 4, 4)) > 0.53).astype(np.uint8)


def literal(mask: np.ndarray) -> np.ndarray:
    out = class_balance(mask.astype(bool))
    for k, channel in enumerate(mask.astype(bool)):
        labels, n = ndimage.label(channel)
        if n >= 2:
            d = np.sort(np.stack([ndimage.distance_transform_edt(labels != i) for i in range(1, n + 1)]), axis=0)
            out[k] += np.where(channel, 0, W0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * SIGMA**2)))
    return out


def seconds(fn, mask: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    result = fn(mask)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn(mask)
    return (time.perf_counter() - start) / repeats, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    figures: dict[str, float | int] = {"size": args.size, "channels": 29}
    for name, mask in (("hand", hand_mask(args.size)), ("blobs", blob_mask(args.size))):
        ours, ours_w = seconds(lambda m: weight_map(m, W0, SIGMA), mask, args.repeats)
        ref, ref_w = seconds(literal, mask, max(1, args.repeats // 5))
        figures[f"objects_per_channel_{name}"] = round(np.mean([ndimage.label(c)[1] for c in mask]), 1)
        figures[f"ms_{name}"] = round(ours * 1e3, 2)
        figures[f"ms_literal_{name}"] = round(ref * 1e3, 2)
        figures[f"speed_ratio_{name}"] = round(ref / ours, 2)
        figures[f"max_abs_diff_{name}"] = float(np.abs(ours_w - ref_w).max())
    emit({"benchmark": "weight_map", **figures})


if __name__ == "__main__":
    main()
