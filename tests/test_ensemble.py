import json
import subprocess
import sys

import numpy as np
import pytest

from segpipe.config import EnsembleConfig
from segpipe.ensemble import ensemble_stores
from segpipe.errors import StoreError
from segpipe.metrics import confusion, scores
from segpipe.store import CaseStore
from segpipe.thresholds import candidates
from tests.conftest import ROOT

CLASSES = ["a", "b"]


def member(path, cases, val_dice=0.8, fold=0, classes=CLASSES, chunk=512):
    """A prediction store; `cases` maps case id -> (role or None, prob); a 4-D prob is a video."""
    model = {"arch": "unet", "fold": fold, "val_dice": val_dice, "classes": list(classes)}
    store = CaseStore.create(path, dataset="d", classes=list(classes), model=model)
    for case_id, (role, prob) in cases.items():
        attrs = {"kind": "video" if prob.ndim == 4 else "image", "group": case_id}
        store.write_case(case_id, attrs if role is None else {**attrs, "role": role})
        store.write_array(case_id, "prob", np.asarray(prob).astype(np.float16), chunk=chunk)
    return path


def labels_store(path, masks, keep=None, classes=CLASSES):
    store = CaseStore.create(path, dataset="d", classes=list(classes))
    for case_id, mask in masks.items():
        store.write_case(case_id, {"kind": "video" if mask.ndim == 4 else "image", "group": case_id})
        store.write_array(case_id, "mask", mask.astype(np.uint8))
        if keep and case_id in keep:
            store.write_array(case_id, "keep", keep[case_id].astype(np.uint8))
    return store


def separable(rng, mask, below, above):
    """Probabilities under `below` where the mask is 0 and at least `above` where it is 1."""
    return np.where(mask > 0, rng.uniform(above, 1, mask.shape), rng.uniform(0, below, mask.shape))


def test_ensemble_of_identical_folds_equals_one_fold(tmp_path):
    prob = np.random.default_rng(1).random((2, 20, 30))
    val = np.zeros((2, 20, 30))
    members = [
        member(tmp_path / f"f{i}.zarr", {"c1": ("test", prob), f"v{i}": ("val", val)}, val_dice=d, fold=i)
        for i, d in enumerate([0.9, 0.5, 0.7])
    ]
    ensemble_stores(members, tmp_path / "ens.zarr", EnsembleConfig(tune=False))
    ens, one = CaseStore(tmp_path / "ens.zarr"), CaseStore(members[0])
    assert np.array_equal(ens.array("c1", "prob")[:], one.array("c1", "prob")[:])
    assert np.array_equal(ens.array("c1", "mask")[:], (one.array("c1", "prob")[:] >= 0.5).astype(np.uint8))


def test_val_dice_weights_pull_the_mean_toward_the_better_member(tmp_path):
    better = member(tmp_path / "a.zarr", {"c1": ("test", np.full((2, 4, 4), 0.25))}, val_dice=0.9)
    worse = member(tmp_path / "b.zarr", {"c1": ("test", np.full((2, 4, 4), 0.75))}, val_dice=0.3, fold=1)
    weighted = ensemble_stores([better, worse], tmp_path / "w.zarr", EnsembleConfig(weighting="val_dice"))
    plain = ensemble_stores([better, worse], tmp_path / "m.zarr", EnsembleConfig(weighting="mean"))

    assert [m["weight"] for m in weighted["members"]] == pytest.approx([0.75, 0.25])
    assert [m["weight"] for m in plain["members"]] == [0.5, 0.5]
    w, m = CaseStore(tmp_path / "w.zarr"), CaseStore(tmp_path / "m.zarr")
    assert np.all(w.array("c1", "prob")[:] == 0.75 * 0.25 + 0.25 * 0.75)  # 0.375, exact in float16
    assert np.all(m.array("c1", "prob")[:] == 0.5)
    assert not w.array("c1", "mask")[:].any() and m.array("c1", "mask")[:].all()
    assert w.attrs["members"] == weighted["members"] and w.attrs["weighting"] == "val_dice"


def _two_fold_val(tmp_path, rng, class_cuts, shape=(2, 16, 16)):
    """Two folds, each holding one validation case out of fold, with classes separable at `class_cuts`
    [(below, above), ...], and one shared test case; returns member paths and the labels store."""
    masks = {f"v{i}": (rng.random(shape) < 0.4).astype(np.uint8) for i in range(2)}
    probs = {
        case_id: np.stack([separable(rng, mask[k], *class_cuts[k]) for k in range(shape[0])])
        for case_id, mask in masks.items()
    }
    test = np.stack([np.full(shape[1:], 0.32), np.full(shape[1:], 0.6)])
    members = [
        member(tmp_path / f"f{i}.zarr", {"t": ("test", test), f"v{i}": ("val", probs[f"v{i}"])}, fold=i)
        for i in range(2)
    ]
    return members, labels_store(tmp_path / "labels.zarr", masks)


def test_tuning_recovers_a_known_best_threshold_for_each_class_independently(tmp_path):
    # Class a separates perfectly only at 0.3, class b only at 0.7 (grid 0.05..0.95).
    members, labels = _two_fold_val(tmp_path, np.random.default_rng(0), [(0.28, 0.31), (0.68, 0.71)])
    summary = ensemble_stores(members, tmp_path / "ens.zarr", EnsembleConfig(), labels)

    a, b = summary["thresholds"]["a"], summary["thresholds"]["b"]
    assert (a["threshold"], a["source"], a["val_dice"]) == (0.3, "tuned", 1.0)
    assert (b["threshold"], b["source"], b["val_dice"]) == (0.7, "tuned", 1.0)
    assert a["val_dice_at_fixed"] < 1 and b["val_dice_at_fixed"] < 1
    assert summary["n_val_cases"] == 2 and summary["n_test_cases"] == 1
    # The test case (0.32 in a, 0.6 in b) is cut by the tuned thresholds, not 0.5.
    mask = CaseStore(tmp_path / "ens.zarr").array("t", "mask")[:]
    assert mask[0].all() and not mask[1].any()


def test_ties_go_to_the_candidate_nearest_the_fixed_threshold(tmp_path):
    # a: every threshold 0.2..0.6 separates, the fixed 0.45 among them; b: 0.65..0.8, all above it.
    members, labels = _two_fold_val(tmp_path, np.random.default_rng(0), [(0.18, 0.62), (0.62, 0.81)])
    summary = ensemble_stores(members, tmp_path / "ens.zarr", EnsembleConfig(threshold=0.45), labels)
    assert {k: v["threshold"] for k, v in summary["thresholds"].items()} == {"a": 0.45, "b": 0.65}


def test_fixed_threshold_when_a_class_has_no_positive_pixels_or_tuning_is_off(tmp_path):
    members, labels = _two_fold_val(tmp_path, np.random.default_rng(0), [(0.28, 0.31), (0.68, 0.71)])
    for case_id in ("v0", "v1"):  # no b anywhere in validation
        mask = labels.array(case_id, "mask")[:]
        mask[1] = 0
        labels.write_array(case_id, "mask", mask)
    summary = ensemble_stores(members, tmp_path / "ens.zarr", EnsembleConfig(threshold=0.4), labels)
    assert summary["thresholds"]["a"]["threshold"] == 0.3
    assert summary["thresholds"]["b"]["threshold"] == 0.4
    assert summary["thresholds"]["b"]["source"] == "no positive validation pixels"

    off = ensemble_stores(members, tmp_path / "off.zarr", EnsembleConfig(tune=False, threshold=0.4), labels)
    assert {(c["threshold"], c["source"]) for c in off["thresholds"].values()} == {(0.4, "tuning off")}


def test_tuned_dice_equals_direct_scoring_of_the_labelled_frames(tmp_path):
    rng = np.random.default_rng(3)
    truth = {f"v{i}": (rng.random((7, 2, 12, 12)) < 0.3).astype(np.uint8) for i in range(2)}
    # On a 1/16 grid (as infer rounds to 1/1024), so many pixels sit exactly on a threshold: `>=` must count them.
    probs = {c: np.round(np.clip(0.5 * m + rng.normal(0.3, 0.25, m.shape), 0, 1) * 16) / 16 for c, m in truth.items()}
    keep = {"v0": np.array([1, 0, 1, 1, 0, 0, 1])}  # v1 has no keep array: all its frames count
    test = rng.random((7, 2, 12, 12))
    members = [
        member(tmp_path / f"f{i}.zarr", {"t": ("test", test), f"v{i}": ("val", probs[f"v{i}"])}, fold=i)
        for i in range(2)
    ]
    labels = labels_store(tmp_path / "labels.zarr", truth, keep)
    cfg = EnsembleConfig(grid_step=0.125, threshold=0.45, batch_frames=3)
    summary = ensemble_stores(members, tmp_path / "ens.zarr", cfg, labels)

    stored = {c: CaseStore(members[i]).array(c, "prob")[:].astype(np.float32) for i, c in enumerate(truth)}
    kept = {"v0": keep["v0"].astype(bool), "v1": np.ones(7, bool)}

    def mean_dice(t):  # (K,) mean over the labelled frames of both cases
        return np.concatenate([
            scores(confusion(stored[c][kept[c]] >= np.float32(t), truth[c][kept[c]]))["dice"] for c in truth
        ]).mean(axis=0)

    curves = np.stack([mean_dice(t) for t in candidates(0.125, 0.45)], axis=1)
    for k, name in enumerate(CLASSES):
        chosen = summary["thresholds"][name]
        assert chosen["val_dice"] == pytest.approx(curves[k].max(), abs=1e-12)
        assert chosen["val_dice_at_fixed"] == pytest.approx(mean_dice(0.45)[k], abs=1e-12)
        assert mean_dice(chosen["threshold"])[k] == pytest.approx(curves[k].max(), abs=1e-12)
    assert {c["source"] for c in summary["thresholds"].values()} == {"tuned"}


def test_videos_processed_in_batches_equal_whole(tmp_path):
    rng = np.random.default_rng(4)
    truth = {"v0": (rng.random((10, 2, 9, 9)) < 0.3).astype(np.uint8)}
    paths = [
        member(tmp_path / f"f{i}.zarr", {
            "t": ("test", rng.random((10, 2, 9, 9))),
            **({"v0": ("val", np.clip(0.6 * truth["v0"] + rng.random((10, 2, 9, 9)) * 0.5, 0, 1))} if i == 0 else {}),
        }, val_dice=0.5 + 0.2 * i, fold=i)
        for i in range(2)
    ]
    labels = labels_store(tmp_path / "labels.zarr", truth, {"v0": np.array([0, 1, 1, 1, 0, 1, 1, 1, 1, 0])})
    whole = ensemble_stores(paths, tmp_path / "whole.zarr", EnsembleConfig(batch_frames=64), labels)
    batched = ensemble_stores(paths, tmp_path / "batched.zarr", EnsembleConfig(batch_frames=3), labels)

    assert whole == batched
    a, b = CaseStore(tmp_path / "whole.zarr"), CaseStore(tmp_path / "batched.zarr")
    for name in ("prob", "mask"):
        assert np.array_equal(a.array("t", name)[:], b.array("t", name)[:])
    assert a.array("t", "prob").shape == (10, 2, 9, 9) and a.array("t", "mask").dtype == np.uint8
    # One chunk (one file) per batch of frames, so no batch's write reads or rewrites another's.
    assert b.array("t", "prob").chunks == b.array("t", "mask").chunks == (3, 2, 9, 9)


def test_images_processed_in_chunk_rows_equal_whole(tmp_path):
    rng = np.random.default_rng(6)
    truth = {"v0": (rng.random((2, 21, 13)) < 0.3).astype(np.uint8)}
    cases = {"t": ("test", rng.random((2, 21, 13))), "v0": ("val", np.clip(0.6 * truth["v0"] + rng.random((2, 21, 13)) * 0.5, 0, 1))}
    labels = labels_store(tmp_path / "labels.zarr", truth)
    summaries, stores = [], []
    for chunk in (512, 8):  # one block, or three bands of 7 rows (21 rows in tiles of at most 8, evenly)
        path = member(tmp_path / f"f{chunk}.zarr", cases, chunk=chunk)
        summaries.append(ensemble_stores([path], tmp_path / f"ens{chunk}.zarr", EnsembleConfig(), labels))
        stores.append(CaseStore(tmp_path / f"ens{chunk}.zarr"))

    assert summaries[0]["thresholds"] == summaries[1]["thresholds"]
    for name in ("prob", "mask"):
        assert np.array_equal(stores[0].array("t", name)[:], stores[1].array("t", name)[:])
    # A shard per band of chunk rows (all classes, full width), as the members are laid out.
    assert stores[1].array("t", "prob").shards == (2, 7, 14)


def test_ensemble_store_holds_only_test_cases_with_float16_prob_and_uint8_mask(tmp_path):
    rng = np.random.default_rng(5)
    shape = (3, 10, 12)
    classes = ["a", "b", "c"]
    cases = {"t1": ("test", rng.random(shape)), "t2": ("test", rng.random(shape)), "v0": ("val", rng.random(shape))}
    path = member(tmp_path / "f0.zarr", cases, classes=classes)
    labels = labels_store(tmp_path / "labels.zarr", {"v0": (rng.random(shape) < 0.5)}, classes=classes)
    summary = ensemble_stores([path], tmp_path / "ens.zarr", EnsembleConfig(), labels)

    ens = CaseStore(tmp_path / "ens.zarr")
    assert ens.case_ids() == ["t1", "t2"]
    for case_id in ("t1", "t2"):
        assert ens.array(case_id, "prob").dtype == np.float16 and ens.array(case_id, "prob").shape == shape
        assert ens.array(case_id, "mask").dtype == np.uint8 and ens.array(case_id, "mask").shape == shape
        assert ens.case_attrs(case_id)["role"] == "test"
    assert ens.attrs["thresholds"] == summary["thresholds"] and list(ens.attrs["thresholds"]) == classes


def test_a_store_without_roles_is_all_test(tmp_path):
    path = member(tmp_path / "f0.zarr", {"c1": (None, np.full((2, 4, 4), 0.7)), "c2": (None, np.zeros((2, 4, 4)))})
    summary = ensemble_stores([path], tmp_path / "ens.zarr", EnsembleConfig())
    assert CaseStore(tmp_path / "ens.zarr").case_ids() == ["c1", "c2"]
    assert {c["source"] for c in summary["thresholds"].values()} == {"no validation cases"}


@pytest.mark.parametrize("disagreement", ["test cases", "classes"])
def test_members_that_disagree_raise_a_store_error_naming_the_store(tmp_path, disagreement):
    prob = np.zeros((2, 4, 4))
    first = member(tmp_path / "f0.zarr", {"c1": ("test", prob)})
    if disagreement == "test cases":
        other = member(tmp_path / "f1.zarr", {"c1": ("test", prob), "c2": ("test", prob)})
    else:
        other = member(tmp_path / "f1.zarr", {"c1": ("test", prob)}, classes=["a", "z"])
    with pytest.raises(StoreError, match=rf"f1\.zarr: {disagreement}"):
        ensemble_stores([first, other], tmp_path / "ens.zarr", EnsembleConfig())
    assert not (tmp_path / "ens.zarr").exists()


def test_stage_writes_the_store_and_a_json_report(tmp_path):
    members, _ = _two_fold_val(tmp_path, np.random.default_rng(0), [(0.28, 0.31), (0.68, 0.71)])
    plan = {"plan": {"tune": {"value": True}, "grid_step": {"value": 0.05}}}  # what the stage reads of a plan
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    args = [
        sys.executable, "-m", "tasks.ensemble", "--dataset", "kvasir", "--params", str(ROOT / "params.yaml"),
        "--labels", str(tmp_path / "labels.zarr"), "--plan", str(tmp_path / "plan.json"), "--members", *map(str, members),
        "--out", str(tmp_path / "ens.zarr"), "--report", str(tmp_path / "ensemble.json"),
    ]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True)
    assert "2/2 thresholds tuned on 2 validation cases" in result.stdout
    report = json.loads((tmp_path / "ensemble.json").read_text())
    assert {k: v["threshold"] for k, v in report["thresholds"].items()} == {"a": 0.3, "b": 0.7}
    assert [m["weight"] for m in report["members"]] == [0.5, 0.5]  # equal val Dice
    assert CaseStore(tmp_path / "ens.zarr").attrs["thresholds"] == report["thresholds"]
