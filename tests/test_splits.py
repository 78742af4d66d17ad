from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from segpipe.errors import ConfigError
from segpipe.splits import make_split


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=4, max_size=30),
    k=st.integers(2, 3),
    seed=st.integers(0, 10_000),
)
def test_no_group_crosses_folds_or_test_for_random_group_structures(sizes, k, seed):
    groups = {f"c{g}_{i}": f"g{g}" for g, n in enumerate(sizes) for i in range(n)}
    split = make_split(groups, k=k, seed=seed, test_fraction=0.2)

    where: dict[str, set[str]] = {}
    for i, fold in enumerate(split.folds):
        assert set(fold.train).isdisjoint(fold.val)
        assert set(fold.train) | set(fold.val) | set(split.test) == set(groups)
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


def test_too_few_groups_is_a_clear_error():
    with pytest.raises(ConfigError, match="split.k=3 needs at least 4 groups"):
        make_split({"a": "g1", "b": "g2", "c": "g3"}, k=3, seed=0, test_fraction=0.2)
