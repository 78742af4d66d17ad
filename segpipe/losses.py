"""Registry of segmentation losses on per-class logits. Classes may overlap (hand bones), so every
loss treats channels independently with a sigmoid, never a softmax."""
from __future__ import annotations

from collections.abc import Callable

import torch
from monai.losses import DiceLoss
from torch import nn

from segpipe.errors import ConfigError


class BCEDiceLoss(nn.Module):
    """Weighted sum of per-channel binary cross-entropy and soft Dice."""

    def __init__(self, bce_weight: float = 0.5, dice_weight: float = 0.5):
        super().__init__()
        self.bce = nn.BCEWithLogitsLoss()
        self.dice = DiceLoss(sigmoid=True)
        self.bce_weight, self.dice_weight = bce_weight, dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.bce_weight * self.bce(logits, target) + self.dice_weight * self.dice(logits, target)


LOSSES: dict[str, Callable[[], nn.Module]] = {"bce_dice": BCEDiceLoss}


def build(name: str) -> nn.Module:
    if name not in LOSSES:
        raise ConfigError(f"train.loss: unknown loss {name!r}; known: {sorted(LOSSES)}")
    return LOSSES[name]()
