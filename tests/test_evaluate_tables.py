"""The evaluation's files: metrics.json keeps the keys downstream readers use, rows per member,
case, class and frame carry the right numbers, the worst cases come first, CSVs are stable."""
import numpy as np
import pytest

from segpipe.evaluate import CaseScores, Evaluation
from segpipe.evaluate_tables import csv_text, metrics_json, per_case_rows, per_class_rows, per_frame_rows, worst

METRICS = ("dice", "iou", "precision", "recall", "hd95", "nsd")


def case(case_id, frames, dice):
    """Scores of a case whose metrics all equal its Dice (F, K), to follow the numbers through."""
    dice = np.asarray(dice, dtype=float)
    confusion = np.zeros((dice.shape[1], dice.shape[1] + 1), int)
    return CaseScores(case_id, np.asarray(frames), {m: dice for m in METRICS}, confusion)


@pytest.fixture
def ev():
    ensemble = [case("v0", [2, 3], [[1.0, 0.5], [0.0, 0.5]]), case("v1", [0], [[0.2, 0.2]])]
    members = {"unet-fold0": [case("v0", [2, 3], [[0.0, 0.0], [0.0, 0.0]]), case("v1", [0], [[1.0, 1.0]])]}
    return Evaluation(["a", "b"], 2.0, ensemble, members, {"a": {"threshold": 0.5}, "b": {"threshold": 0.5}},
                      vs_truth=[case("v0", [2], [[0.9, 0.7]])])


def test_metrics_json_keeps_the_headline_keys_and_adds_boundary_metrics_and_members(ev):
    m = metrics_json(ev, n_cases=2)
    for key in ("dice", "iou", "precision", "recall", "hd95", "nsd", "n_cases", "n_samples", "per_class"):
        assert key in m
    # Means over the 3 frames per class, then over classes: a (1 + 0 + 0.2) / 3, b (0.5 + 0.5 + 0.2) / 3
    assert m["per_class"]["a"]["dice"] == pytest.approx(0.4) and m["per_class"]["b"]["hd95"] == pytest.approx(0.4)
    assert m["dice"] == pytest.approx(0.4) and m["n_samples"] == 3 and m["n_cases"] == 2
    assert m["members"] == {"unet-fold0": {k: pytest.approx(1 / 3) for k in METRICS}}
    assert m["vs_truth"]["dice"] == pytest.approx(0.8)


def test_per_case_rows_put_the_ensemble_first_then_each_member_on_the_same_cases(ev):
    rows = per_case_rows(ev)
    assert [(r["member"], r["case"], r["class"]) for r in rows] == [
        (member, c, k) for member in ("ensemble", "unet-fold0") for c in ("v0", "v1") for k in ("a", "b")
    ]
    assert rows[0]["dice"] == 0.5 and rows[0]["frames"] == 2 and rows[1]["nsd"] == 0.5


def test_per_frame_rows_carry_the_time_of_video_frames(ev):
    rows = per_frame_rows(ev, fps={"v0": 4.0})
    assert [(r["case"], r["frame"], r["time_s"], r["class"], r["dice"]) for r in rows[:2]] == [
        ("v0", 2, 0.5, "a", 1.0), ("v0", 2, 0.5, "b", 0.5)]
    assert rows[-1]["time_s"] == ""  # v1 has no frame rate: an image


def test_per_class_rows_are_the_ensembles_means(ev):
    assert [(r["class"], round(r["dice"], 6)) for r in per_class_rows(ev)] == [("a", 0.4), ("b", 0.4)]


def test_worst_frames_and_worst_cases_come_lowest_dice_first(ev):
    assert [(w.case_id, w.frame, w.dice) for w in worst(ev.ensemble, 2, by_frame=True)] == [
        ("v1", 0, pytest.approx(0.2)), ("v0", 3, 0.25)]
    # Per case: v0's mean is (0.75 + 0.25) / 2, shown at its worst frame.
    assert [(w.case_id, w.frame, w.dice) for w in worst(ev.ensemble, 5, by_frame=False)] == [
        ("v1", 0, pytest.approx(0.2)), ("v0", 3, 0.5)]


def test_csv_rounds_floats_to_six_decimals():
    text = csv_text([{"case": "c", "dice": np.float64(1 / 3), "frames": 2}])
    assert text == "case,dice,frames\nc,0.333333,2\n"
