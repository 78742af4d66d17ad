"""The bare MONAI baseline of issue 24: the plain script a user would write for Kvasir-SEG, and the
scoring that every contender on the same held-out cases shares.

    python -m benchmarks.kvasir_baseline [--raw ../shared/data/kvasir-seg] [--minutes 20]

Holds out a fixed 60 of the 300 real pairs, trains a MONAI UNet on the other 240 at 256x256 for a
wall-clock budget (DiceCE, AdamW, cosine lr over the budget, albumentations flips, affine and colour
jitter), and scores the held-out cases at their original size. `benchmarks/real_kvasir.py` imports
these functions, so segpipe is measured on the same cases, with the same Dice and IoU.
Prints one JSON line: steps done, mean Dice and mean IoU over the held-out cases.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.utils import set_determinism
from PIL import Image

from benchmarks.common import ROOT, emit

RAW = ROOT.parent / "shared" / "data" / "kvasir-seg"
SIZE, BATCH, LR = 256, 8, 1e-3


@dataclass
class Baseline:
    model: torch.nn.Module
    steps: int


def held_out_ids(raw: Path, n: int = 60, seed: int = 0) -> list[str]:
    """A fixed, sorted choice of n case ids (the stems of raw/images/*.jpg), the same on every run."""
    ids = sorted(p.stem for p in (raw / "images").glob("*.jpg"))
    if not (raw / "masks").is_dir() or len(ids) <= n:
        raise ValueError(f"{raw}: no Kvasir-SEG layout (images/, masks/) with more than {n} .jpg images here")
    return sorted(np.random.default_rng(seed).choice(ids, size=n, replace=False).tolist())


def read_image(raw: Path, case_id: str) -> np.ndarray:
    return np.asarray(Image.open(raw / "images" / f"{case_id}.jpg").convert("RGB"))


def read_truth(raw: Path, case_id: str) -> np.ndarray:
    """The true mask, bool (H, W): the masks are JPEGs, so their compression noise is cut at 127."""
    return np.asarray(Image.open(raw / "masks" / f"{case_id}.jpg").convert("L")) > 127


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two bool masks of one image; both 1.0 when both masks are empty."""
    inter, total = int((pred & truth).sum()), int(pred.sum() + truth.sum())
    if total == 0:
        return 1.0, 1.0
    return 2 * inter / total, inter / (total - inter)


def to_input(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 images as (B, 3, H, W) float, each image at zero mean and unit std over all channels."""
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float()
    return (x - x.mean(dim=(1, 2, 3), keepdim=True)) / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-6)


def load_cases(raw: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The cases resized once to SIZE: images (N, SIZE, SIZE, 3) uint8, masks (N, SIZE, SIZE) uint8 0/1."""
    images = [Image.fromarray(read_image(raw, i)).resize((SIZE, SIZE), Image.Resampling.BILINEAR) for i in ids]
    masks = [Image.fromarray(read_truth(raw, i)).resize((SIZE, SIZE), Image.Resampling.NEAREST) for i in ids]
    return np.stack(images), np.stack(masks).astype(np.uint8)


def batches(images: np.ndarray, masks: np.ndarray, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless augmented batches (input, target), drawn from a generator and an augmentation seeded alike."""
    rng = np.random.default_rng(seed)
    augment = A.Compose([
        A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5),
        A.Affine(scale=(0.85, 1.15), rotate=(-15, 15), translate_percent=(-0.05, 0.05), p=0.8),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.8),
    ], seed=seed)
    while True:
        pairs = [augment(image=images[i], mask=masks[i]) for i in rng.integers(len(images), size=BATCH)]
        x = to_input(np.stack([p["image"] for p in pairs]))
        y = torch.from_numpy(np.stack([p["mask"] for p in pairs])).unsqueeze(1).float()
        yield x, y


def train_baseline(raw: Path, train_ids: list[str], minutes: float, seed: int = 0) -> Baseline:
    """A MONAI UNet trained on train_ids for `minutes` of wall clock, the lr annealed to 0 over the budget."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
    set_determinism(seed=seed)  # torch, numpy and random
    model = UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(32, 64, 128, 256, 512),
                 strides=(2, 2, 2, 2), num_res_units=2, norm="INSTANCE")
    loss_fn, optimizer = DiceCELoss(sigmoid=True), torch.optim.AdamW(model.parameters(), lr=LR)
    data = batches(*load_cases(raw, train_ids), seed=seed)
    model.train()
    budget, steps, start = minutes * 60, 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget:
        for group in optimizer.param_groups:
            group["lr"] = LR * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        x, y = next(data)
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        steps += 1
    return Baseline(model, steps)


def predict_mask(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """The predicted bool (H, W) mask of one RGB image, at the image's own size."""
    model.eval()
    small = np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    with torch.no_grad():
        prob = torch.sigmoid(model(to_input(small[None])))
        prob = F.interpolate(prob, size=image.shape[:2], mode="bilinear", align_corners=False)
    return prob[0, 0].numpy() > 0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raw", type=Path, default=RAW)
    p.add_argument("--minutes", type=float, default=20.0)
    args = p.parse_args()
    try:
        held_out = held_out_ids(args.raw)
    except ValueError as e:
        sys.exit(f"error: {e}")
    train_ids = sorted({f.stem for f in (args.raw / "images").glob("*.jpg")} - set(held_out))

    baseline = train_baseline(args.raw, train_ids, args.minutes)
    scores = [dice_iou(predict_mask(baseline.model, read_image(args.raw, i)), read_truth(args.raw, i))
              for i in held_out]
    dice, iou = np.mean(scores, axis=0)
    emit({"benchmark": "kvasir_baseline", "minutes": args.minutes, "steps": baseline.steps,
          "train_cases": len(train_ids), "held_out": len(held_out),
          "mean_dice": round(float(dice), 4), "mean_iou": round(float(iou), 4)})


if __name__ == "__main__":
    main()
