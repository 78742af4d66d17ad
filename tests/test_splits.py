import json

from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from segpipe.errors import ConfigError
from segpipe.splits import make_split, read_split, strata_of


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=4, max_size=30),
    k=st.integers(2, 3),
    seed=st.integers(0, 10_000),
    n_strata=st.integers(1, 4),
)
def test_no_group_crosses_folds_or_test_for_random_group_structures(sizes, k, seed, n_strata):
    groups = {f"c{g}_{i}": f"g{g}" for g, n in enumerate(sizes) for i in range(n)}
    # Strata that mix within groups, as cases of one patient may differ.
    strata = {f"c{g}_{i}": f"s{(3 * g + i) % n_strata}" for g, n in enumerate(sizes) for i in range(n)}
    split = make_split(groups, k=k, seed=seed, test_fraction=0.2, strata=strata)

    where: dict[str, set[str]] = {}
    for i, fold in enumerate(split.folds):
        assert set(fold.train).isdisjoint(fold.val)
        assert set(fold.train) | set(fold.val) | set(split.test) == set(groups)
        assert fold.val, "every fold validates on something"
        for case in fold.val:
            where.setdefault(groups[case], set()).add(f"fold{i}")
    for case in split.test:
        where.setdefault(groups[case], set()).add("test")
    assert all(len(places) == 1 for places in where.values())
    validated = [c for f in split.folds for c in f.val]
    assert len(validated) == len(set(validated)), "each case is validated in exactly one fold"
    assert sum(len(f.val) for f in split.folds) + len(split.test) == len(groups)
    assert split.test, "a held-out test set always exists"


def test_same_seed_gives_the_same_split_and_another_seed_a_different_one():
    groups = {f"c{i}": f"g{i % 10}" for i in range(40)}
    a = make_split(groups, k=3, seed=1, test_fraction=0.25)
    assert a == make_split(groups, k=3, seed=1, test_fraction=0.25)
    assert a.test != make_split(groups, k=3, seed=2, test_fraction=0.25).test


def test_folds_are_balanced_in_cases():
    groups = {f"c{i}": f"g{i}" for i in range(30)}
    split = make_split(groups, k=3, seed=0, test_fraction=0.2)
    assert [len(f.val) for f in split.folds] == [8, 8, 8]
    assert len(split.test) == 6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_fold_and_the_test_set_get_their_share_of_every_stratum(seed):
    # 60 single-case groups in strata of unequal sizes (30 small, 20 medium, 10 large polyps).
    strata = {f"c{i}": "small" if i < 30 else "medium" if i < 50 else "large" for i in range(60)}
    groups = {c: f"g{c}" for c in strata}
    split = make_split(groups, k=3, seed=seed, test_fraction=0.25, strata=strata)
    for stratum, total in (("small", 30), ("medium", 20), ("large", 10)):
        # Target: a quarter of the stratum in test and in each fold; off by at most one case.
        for cases in [split.test] + [f.val for f in split.folds]:
            assert abs(sum(strata[c] == stratum for c in cases) - total / 4) <= 1, (stratum, seed)
    assert split.strata == strata


def test_strata_are_balanced_with_whole_groups_of_unequal_sizes():
    # 24 patients with 1..3 cases each; a patient's cases share a stratum (e.g. one disease stage).
    groups, strata = {}, {}
    for g in range(24):
        for i in range(1 + g % 3):
            groups[f"p{g}_{i}"], strata[f"p{g}_{i}"] = f"p{g}", f"s{g % 4 // 2}"
    split = make_split(groups, k=3, seed=0, test_fraction=0.25, strata=strata)
    bins = [split.test] + [f.val for f in split.folds]
    for stratum in ("s0", "s1"):
        counts = [sum(strata[c] == stratum for c in cases) for cases in bins]
        assert max(counts) - min(counts) <= 3, (stratum, counts)  # one group of the largest size


def test_too_few_groups_is_a_clear_error():
    with pytest.raises(ConfigError, match="split.k=3 needs at least 4 groups"):
        make_split({"a": "g1", "b": "g2", "c": "g3"}, k=3, seed=0, test_fraction=0.2)


def test_mask_area_strata_are_quantile_bins_of_the_foreground_fraction(disc_stores):
    _, labels = disc_stores
    cases = labels.case_ids()
    strata = strata_of(labels, cases, "mask_area", bins=3)
    area = {c: labels.array(c, "mask")[:].mean() for c in cases}
    by_area = sorted(cases, key=area.get)
    assert [strata[c] for c in by_area] == ["area_bin0"] * 4 + ["area_bin1"] * 4 + ["area_bin2"] * 4
    assert strata_of(labels, cases, "class_count") == {c: "1_classes" for c in cases}
    assert strata_of(labels, cases, "none") == {}
    with pytest.raises(ConfigError, match="unknown stratification 'size'"):
        strata_of(labels, cases, "size")


def test_split_json_round_trips_with_its_strata(tmp_path):
    groups = {f"c{i}": f"g{i}" for i in range(8)}
    strata = {c: f"s{i % 2}" for i, c in enumerate(groups)}
    split = make_split(groups, k=2, seed=0, test_fraction=0.25, strata=strata)
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split.to_json()))
    assert read_split(path) == split
    assert len(split.test) == 2 and split.strata == strata


def test_listed_test_cases_are_the_test_set_with_their_groups_and_the_rest_fill_the_folds():
    groups = {f"c{i:02d}": f"g{i // 2}" for i in range(20)}
    split = make_split(groups, k=3, seed=0, test_fraction=0.5, test_cases=["c00", "c05"])
    assert split.test == ["c00", "c01", "c04", "c05"]  # whole groups g0 and g2, whatever test_fraction says
    assert sorted(c for fold in split.folds for c in fold.val) == sorted(set(groups) - set(split.test))
    assert all(fold.val for fold in split.folds)
    with pytest.raises(ConfigError, match=r"split.test_list: 1 case\(s\) not in the dataset"):
        make_split(groups, k=3, seed=0, test_fraction=0.5, test_cases=["nope"])
