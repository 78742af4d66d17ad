import numpy as np

from segpipe.ensemble import ensemble_stores
from segpipe.store import CaseStore


def _member(path, probs):
    store = CaseStore.create(path, dataset="d", classes=["a", "b"])
    for case_id, prob in probs.items():
        store.write_case(case_id, {"kind": "image", "group": case_id})
        store.write_array(case_id, "prob", prob.astype(np.float16))
    return path


def test_ensemble_of_identical_folds_equals_one_fold(tmp_path):
    probs = {"c1": np.random.default_rng(1).random((2, 20, 30))}
    members = [_member(tmp_path / f"f{i}.zarr", probs) for i in range(3)]
    ensemble_stores(members, tmp_path / "ens.zarr", threshold=0.5)
    ens = CaseStore(tmp_path / "ens.zarr")
    one = CaseStore(members[0])
    assert np.array_equal(ens.array("c1", "prob")[:], one.array("c1", "prob")[:])
    assert np.array_equal(ens.array("c1", "mask")[:], (one.array("c1", "prob")[:] >= 0.5).astype(np.uint8))


def test_ensemble_is_the_mean_of_members(tmp_path):
    a = _member(tmp_path / "a.zarr", {"c1": np.full((2, 4, 4), 0.2)})
    b = _member(tmp_path / "b.zarr", {"c1": np.full((2, 4, 4), 0.9)})
    ensemble_stores([a, b], tmp_path / "ens.zarr", threshold=0.5)
    ens = CaseStore(tmp_path / "ens.zarr")
    assert np.allclose(ens.array("c1", "prob")[:], 0.55, atol=1e-3)
    assert ens.array("c1", "mask")[:].all()
