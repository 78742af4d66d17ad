import numpy as np
import pytest

from segpipe.metrics import confusion, mean_dice, scores, summarize


def test_scores_match_hand_computed_counts():
    pred = np.zeros((1, 1, 4, 4), bool)
    ref = np.zeros((1, 1, 4, 4), bool)
    pred[0, 0, :2, :2] = True  # 4 pixels
    ref[0, 0, :2, :3] = True  # 6 pixels, 4 shared
    s = scores(confusion(pred, ref))
    assert s["dice"][0, 0] == pytest.approx(8 / 10)
    assert s["iou"][0, 0] == pytest.approx(4 / 6)
    assert s["precision"][0, 0] == pytest.approx(1.0)
    assert s["recall"][0, 0] == pytest.approx(4 / 6)


def test_class_absent_from_both_scores_one_and_from_one_side_scores_zero():
    pred = np.zeros((2, 1, 3, 3), bool)
    ref = np.zeros((2, 1, 3, 3), bool)
    ref[1, 0, 1, 1] = True
    s = scores(confusion(pred, ref))
    assert [s[m][0, 0] for m in ("dice", "iou", "precision", "recall")] == [1, 1, 1, 1]
    assert [s[m][1, 0] for m in ("dice", "iou", "precision", "recall")] == [0, 0, 0, 0]


def test_summary_averages_samples_per_class_then_classes():
    per_sample = {m: np.array([[1.0, 0.0], [0.5, 0.0]]) for m in ("dice", "iou", "precision", "recall")}
    out = summarize(per_sample, ["a", "b"])
    assert out["per_class"]["a"]["dice"] == 0.75
    assert out["per_class"]["b"]["dice"] == 0.0
    assert out["dice"] == 0.375
    assert out["n_samples"] == 2


def test_mean_dice_of_identical_masks_is_one():
    m = np.random.default_rng(0).random((3, 2, 8, 8)) > 0.5
    assert mean_dice(m, m) == 1.0


def overlap(pred, ref):
    s = scores(confusion(np.asarray(pred, bool)[None, None], np.asarray(ref, bool)[None, None]))
    return [float(s[m][0, 0]) for m in ("dice", "iou", "precision", "recall")]


def test_full_masks_score_one_and_a_full_prediction_of_one_pixel_scores_its_share():
    full, dot = np.ones((4, 5), bool), np.zeros((4, 5), bool)
    dot[1, 2] = True
    assert overlap(full, full) == [1, 1, 1, 1]
    # 1 true pixel among 20 predicted: precision 1/20, Dice 2/21, IoU 1/20, recall 1
    assert overlap(full, dot) == pytest.approx([2 / 21, 1 / 20, 1 / 20, 1.0])


def test_a_one_pixel_object_found_or_missed_by_one_pixel():
    here, there = np.zeros((3, 3), bool), np.zeros((3, 3), bool)
    here[1, 1], there[1, 2] = True, True
    assert overlap(here, here) == [1, 1, 1, 1]
    assert overlap(here, there) == [0, 0, 0, 0]


def test_summary_carries_every_metric_it_is_given():
    per_sample = {"dice": np.array([[1.0], [0.0]]), "hd95": np.array([[0.0], [10.0]])}
    out = summarize(per_sample, ["a"])
    assert out["hd95"] == 5.0 and out["per_class"]["a"] == {"dice": 0.5, "hd95": 5.0}
