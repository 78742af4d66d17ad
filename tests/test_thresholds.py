"""What tuning records per class: the chosen threshold and, for a tuned class, the validation Dice
curve it was chosen from (the evaluation report draws it)."""
import numpy as np
import pytest

from segpipe.thresholds import candidates, choose


def test_a_tuned_class_records_its_curve_and_an_untuned_one_none():
    grid = candidates(0.25, 0.5)  # 0.25, 0.5, 0.75
    dice = np.array([[0.2, 0.6, 0.4], [0.0, 0.0, 0.0]])
    tuned, no_positives = choose(grid, dice, positives=np.array([10, 0]), fixed=0.5)
    assert tuned["threshold"] == 0.5 and tuned["source"] == "tuned"
    assert tuned["val_dice_curve"] == {"thresholds": [0.25, 0.5, 0.75], "val_dice": [0.2, 0.6, 0.4]}
    assert max(tuned["val_dice_curve"]["val_dice"]) == pytest.approx(tuned["val_dice"])
    assert "val_dice_curve" not in no_positives and no_positives["source"] == "no positive validation pixels"
