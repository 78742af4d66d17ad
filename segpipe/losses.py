"""Registry of segmentation losses on per-class logits. Classes may overlap (hand bones), so every
loss treats channels independently with a sigmoid, never a softmax.

Contract with the training loop: a loss is an nn.Module called as `loss(logits, target)`, both
(N, K, H, W) float. A loss whose class has `needs_weight_map = True` is called as
`loss(logits, target, weight)` instead, with weight (N, K, H, W) float from its
`weight_map(mask (K, H, W) uint8)`, computed once per sample by the caller and cached.
output_loss applies a loss to what a network returns in training, deep-supervision outputs included.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceFocalLoss, DiceLoss, TverskyLoss
from torch import nn

from segpipe.config import LossConfig
from segpipe.errors import ConfigError
from segpipe.weightmap import weight_map


class BCEDiceLoss(nn.Module):
    """Weighted sum of per-channel binary cross-entropy and soft Dice."""

    def __init__(self, bce_weight: float = 0.5, dice_weight: float = 0.5):
        super().__init__()
        self.bce = nn.BCEWithLogitsLoss()
        self.dice = DiceLoss(sigmoid=True)
        self.bce_weight, self.dice_weight = bce_weight, dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.bce_weight * self.bce(logits, target) + self.dice_weight * self.dice(logits, target)


class FocalTverskyLoss(nn.Module):
    """mean over samples and channels of (1 - Tversky index) ** gamma (Abraham & Khan 2019)."""

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, gamma: float = 0.75):
        super().__init__()
        self.tversky = TverskyLoss(sigmoid=True, alpha=alpha, beta=beta, reduction="none")
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Floored: x ** 0.75 has an infinite slope at 0, reached once a prediction saturates.
        return self.tversky(logits, target).clamp_min(1e-6).pow(self.gamma).mean()


class BorderWeightedBCELoss(nn.Module):
    """The U-Net paper's loss: per-channel BCE, each pixel weighted by `weight_map` (segpipe/weightmap.py)."""

    needs_weight_map = True

    def __init__(self, w0: float = 10.0, sigma: float = 5.0):
        super().__init__()
        self.w0, self.sigma = w0, sigma

    def weight_map(self, mask: np.ndarray) -> np.ndarray:
        return weight_map(mask, self.w0, self.sigma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return (weight * F.binary_cross_entropy_with_logits(logits, target, reduction="none")).mean()


LOSSES: dict[str, Callable[[LossConfig], nn.Module]] = {
    "bce": lambda o: nn.BCEWithLogitsLoss(),
    "bce_dice": lambda o: BCEDiceLoss(o.bce_weight, o.dice_weight),
    "dice_focal": lambda o: DiceFocalLoss(
        sigmoid=True, gamma=o.focal_gamma, lambda_dice=o.dice_weight, lambda_focal=o.focal_weight
    ),
    "tversky": lambda o: TverskyLoss(sigmoid=True, alpha=o.tversky_alpha, beta=o.tversky_beta),
    "focal_tversky": lambda o: FocalTverskyLoss(o.tversky_alpha, o.tversky_beta, o.tversky_gamma),
    "unet_weighted": lambda o: BorderWeightedBCELoss(o.border_w0, o.border_sigma),
}


def build(name: str, options: LossConfig | None = None) -> nn.Module:
    """The loss `name` with its options (train.loss_options; defaults when None)."""
    if name not in LOSSES:
        raise ConfigError(f"train.loss: unknown loss {name!r}; known: {sorted(LOSSES)}")
    return LOSSES[name](options or LossConfig())


def output_loss(loss_fn: nn.Module, logits: torch.Tensor, target: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """`loss_fn` of a training forward pass. A deep-supervision network (dynunet) returns the outputs
    of several decoder levels, upsampled, stacked on dim 1: MONAI's DeepSupervisionLoss sums their
    losses weighted 1, 1/2, 1/4, ... (finest first)."""
    if logits.ndim == target.ndim:
        return loss_fn(logits, target) if weight is None else loss_fn(logits, target, weight)
    if weight is not None:
        raise ConfigError("train.loss: a loss with a weight map cannot train a deep-supervision network (dynunet)")
    return DeepSupervisionLoss(loss_fn)(list(logits.unbind(1)), target)
