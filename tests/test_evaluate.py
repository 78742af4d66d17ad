"""Scoring cases: banded and bit-packed reading gives the metrics of whole masks, frames are the
labelled ones, members are cut at the ensemble's thresholds, and missed pixels are attributed to
the class predicted there."""
import numpy as np
import pytest

from segpipe import evaluate
from segpipe.boundary_metrics import boundary_scores
from segpipe.errors import StoreError
from segpipe.evaluate import CaseMasks, evaluate_ensemble, missed_as, score_case, summary
from segpipe.metrics import confusion, scores
from segpipe.store import CaseStore


def whole_metrics(pred, ref, tolerance):
    """The metrics of (N, K, H, W) masks computed in one go, without bands or packing."""
    return {**scores(confusion(pred, ref)), **boundary_scores(pred, ref, tolerance)}


def test_a_tall_image_scored_in_bands_matches_the_whole_image(monkeypatch):
    monkeypatch.setattr(evaluate, "BAND_ROWS", 16)  # 50 rows: four bands, objects across their edges
    rng = np.random.default_rng(1)
    ref = np.zeros((3, 50, 21), np.uint8)
    pred = np.zeros((3, 50, 21), np.uint8)
    ref[0, 10:40, 3:12], pred[0, 12:44, 4:12] = 1, 1  # overlapping boxes across bands
    ref[1, 30:35, 15:20] = 1  # class 1 missed entirely; class 2 invented: width 21 is not a multiple of 8
    pred[2] = rng.random((50, 21)) > 0.9
    case = score_case("c", CaseMasks(pred, video=False), CaseMasks(ref, video=False), np.array([0]), 1.5)
    expected = whole_metrics(pred[None] != 0, ref[None] != 0, 1.5)
    assert set(case.values) == set(expected)
    for name, values in expected.items():
        np.testing.assert_allclose(case.values[name], values, err_msg=name)
    assert case.values["hd95"][0, 1] == pytest.approx(np.hypot(50, 21))  # missed: the diagonal


def test_a_video_is_scored_on_the_given_frames_across_batches(monkeypatch):
    monkeypatch.setattr(evaluate, "BATCH_FRAMES", 4)
    rng = np.random.default_rng(2)
    ref = (rng.random((11, 1, 9, 9)) > 0.5).astype(np.uint8)
    pred = (rng.random((11, 1, 9, 9)) > 0.5).astype(np.uint8)
    frames = np.array([1, 2, 7, 10])
    case = score_case("v", CaseMasks(pred, video=True), CaseMasks(ref, video=True), frames, 1.0)
    assert case.frames.tolist() == [1, 2, 7, 10]
    expected = whole_metrics(pred[frames] != 0, ref[frames] != 0, 1.0)
    for name, values in expected.items():
        np.testing.assert_allclose(case.values[name], values, err_msg=name)


def test_probabilities_are_cut_where_they_reach_the_threshold():
    prob = np.array([[[0.3, 0.5, 0.7]], [[0.7, 0.7, 0.7]]], dtype=np.float16)  # (K=2, 1, 3)
    masks = CaseMasks(prob, video=False, thresholds=np.array([0.5, 0.8], np.float32)).block(0, 1, slice(None))
    assert masks.tolist() == [[[[False, True, True]], [[False, False, False]]]]


def test_missed_pixels_are_attributed_to_the_classes_predicted_there():
    ref, pred = np.zeros((1, 3, 2, 4), bool), np.zeros((1, 3, 2, 4), bool)
    ref[0, 0] = True  # class 0 everywhere (8 px); predicted on 2 of them
    pred[0, 0, 0, :2] = True
    pred[0, 1, 0, 2:] = True  # class 1 takes 2 of its missed pixels
    pred[0, 2, 0, 3] = True  # class 2 one of those as well (classes overlap)
    out = missed_as(pred, ref)
    assert out[0].tolist() == [0, 2, 1, 4]  # by class 0, 1, 2, and 4 pixels where nothing was predicted
    assert out[1:].sum() == 0  # classes 1 and 2 are not true anywhere: nothing of theirs missed


def write_case(store, case_id, name, data):
    store.write_case(case_id, {"kind": "image", "role": "test"})
    store.write_array(case_id, name, data)


@pytest.fixture
def stores(tmp_path):
    """Labels, an ensemble (threshold 0.7 recorded) and a member of two one-class cases."""
    labels = CaseStore.create(tmp_path / "labels.zarr", dataset="d", classes=["a"])
    ensemble = CaseStore.create(tmp_path / "ens.zarr", dataset="d", classes=["a"],
                                thresholds={"a": {"threshold": 0.7, "source": "tuned"}})
    member = CaseStore.create(tmp_path / "m.zarr", dataset="d", classes=["a"], model={"arch": "unet", "fold": 1})
    truth = np.zeros((1, 8, 8), np.uint8)
    truth[0, 2:6, 2:6] = 1
    for case_id in ("c0", "c1"):
        write_case(labels, case_id, "mask", truth)
        write_case(ensemble, case_id, "mask", truth if case_id == "c0" else np.zeros_like(truth))
        # The member is sure of c0's square (0.9) and half sure of c1's (0.6): below the recorded 0.7.
        write_case(member, case_id, "prob", (truth * (0.9 if case_id == "c0" else 0.6)).astype(np.float16))
    return labels, ensemble, member


def test_members_are_scored_on_the_same_cases_cut_at_the_ensembles_thresholds(stores):
    labels, ensemble, member = stores
    ev = evaluate_ensemble(ensemble, labels, [member], ["c0", "c1"], tolerance=1.0)
    assert [c.case_id for c in ev.ensemble] == [c.case_id for c in ev.members["unet-fold1"]] == ["c0", "c1"]
    assert [c.values["dice"][0, 0] for c in ev.ensemble] == [1.0, 0.0]
    # At 0.5 the member would have found c1's square; at the ensemble's 0.7 it did not.
    assert [c.values["dice"][0, 0] for c in ev.members["unet-fold1"]] == [1.0, 0.0]
    assert summary(ev.ensemble, ev.classes)["hd95"] == pytest.approx((0 + np.hypot(8, 8)) / 2)
    assert ev.thresholds["a"]["threshold"] == 0.7


def test_an_ensemble_without_recorded_thresholds_is_named(stores, tmp_path):
    labels, _, member = stores
    bare = CaseStore.create(tmp_path / "bare.zarr", dataset="d", classes=["a"])
    with pytest.raises(StoreError, match="bare.zarr: no recorded threshold"):
        evaluate_ensemble(bare, labels, [member], ["c0"], tolerance=1.0)


def test_stores_of_other_classes_are_refused(stores, tmp_path):
    labels, ensemble, _ = stores
    other = CaseStore.create(tmp_path / "other.zarr", dataset="d", classes=["b"])
    with pytest.raises(StoreError, match="other.zarr: classes"):
        evaluate_ensemble(ensemble, labels, [other], ["c0"], tolerance=1.0)
