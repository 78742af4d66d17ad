"""The loss registry: values against hand computations, per-channel sigmoids, options, the contract."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segpipe import losses
from segpipe.config import LossConfig
from segpipe.errors import ConfigError

LN2 = math.log(2)


def call(loss_fn, logits, target, weight=None):
    """The training loop's contract: a weight map only for losses that declare they need one."""
    if getattr(loss_fn, "needs_weight_map", False):
        return loss_fn(logits, target, torch.ones_like(target) if weight is None else weight)
    return loss_fn(logits, target)


def test_bce_is_binary_cross_entropy_with_logits_per_element():
    logits = torch.tensor([2.0, 2.0, -1.0, 0.0]).view(1, 2, 1, 2)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 2, 1, 2)
    by_hand = [math.log(1 + math.exp(-2)), 2 + math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1)), LN2]
    assert losses.build("bce")(logits, target).item() == pytest.approx(np.mean(by_hand), rel=1e-6)


# Logits 0 (every probability 0.5) against an all-ones target of n pixels: BCE = ln 2; soft Dice =
# 1 - 2(n/2) / (n/2 + n) = 1/3; focal = ln 2 * 0.5**gamma; Tversky index = (n/2) / (n/2 + beta n/2).
@pytest.mark.parametrize(
    ("name", "options", "by_hand"),
    [
        ("bce_dice", LossConfig(), 0.5 * LN2 + 0.5 / 3),
        ("bce_dice", LossConfig(bce_weight=0.2, dice_weight=0.8), 0.2 * LN2 + 0.8 / 3),
        ("dice_focal", LossConfig(), 0.5 / 3 + 0.5 * LN2 * 0.25),
        ("dice_focal", LossConfig(focal_gamma=1, dice_weight=0, focal_weight=1), LN2 * 0.5),
        ("tversky", LossConfig(), 1 - 1 / 1.7),
        ("tversky", LossConfig(tversky_alpha=0.7, tversky_beta=0.3), 1 - 1 / 1.3),
        ("focal_tversky", LossConfig(), (1 - 1 / 1.7) ** 0.75),
        ("focal_tversky", LossConfig(tversky_gamma=2), (1 - 1 / 1.7) ** 2),
        ("unet_weighted", LossConfig(), LN2),
    ],
)
def test_loss_values_match_hand_computations_and_follow_the_options(name, options, by_hand):
    loss_fn = losses.build(name, options)
    assert call(loss_fn, torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)).item() == pytest.approx(by_hand, rel=1e-4)


def test_border_weighted_loss_is_the_mean_of_weight_times_bce():
    target = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 2, 2)
    weight = torch.tensor([3.0, 1.0, 0.0, 10.0]).view(1, 1, 2, 2)
    logits = torch.full((1, 1, 2, 2), 1.0)
    # Pixel BCE at logit 1: target 1 -> ln(1 + e^-1), target 0 -> 1 + ln(1 + e^-1).
    soft = math.log(1 + math.exp(-1))
    by_hand = (3 * soft + 1 * (1 + soft) + 0 + 10 * (1 + soft)) / 4
    assert losses.build("unet_weighted")(logits, target, weight).item() == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_overlapping_classes_are_learnt_independently_never_through_a_softmax(name):
    """Two classes both present at every pixel (overlapping bones): confident logits on both must
    score near 0, which a softmax over classes could never allow."""
    target = torch.ones(1, 2, 4, 4)
    confident, wrong = torch.full_like(target, 12.0), torch.full_like(target, -12.0)
    loss_fn = losses.build(name)
    assert call(loss_fn, confident, target).item() < 1e-3
    assert call(loss_fn, wrong, target).item() > 0.3


def test_only_the_border_weighted_loss_needs_a_weight_map_built_with_its_options():
    needing = [name for name in losses.LOSSES if getattr(losses.build(name), "needs_weight_map", False)]
    assert needing == ["unet_weighted"]
    mask = np.zeros((1, 8, 12), np.uint8)
    mask[0, 2:6, 2:5] = mask[0, 2:6, 6:9] = 1  # two objects, one pixel apart
    plain = losses.build("unet_weighted", LossConfig(border_w0=0)).weight_map(mask)
    bordered = losses.build("unet_weighted", LossConfig(border_w0=5)).weight_map(mask)
    assert bordered[0, 3, 5] - plain[0, 3, 5] == pytest.approx(5 * math.exp(-4 / 50), rel=1e-5)


def test_build_without_options_uses_the_documented_defaults():
    fn = losses.build("bce_dice")
    assert (fn.bce_weight, fn.dice_weight) == (0.5, 0.5)


def test_unknown_loss_is_a_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError, match="unknown loss 'dice'.*focal_tversky.*unet_weighted"):
        losses.build("dice")
