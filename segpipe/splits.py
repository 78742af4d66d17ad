"""Leakage-free K-fold splits: whole groups (speaker, patient, video) go to one fold or to the test set."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segpipe.errors import ConfigError


@dataclass(frozen=True)
class Fold:
    train: list[str]
    val: list[str]


@dataclass(frozen=True)
class Split:
    folds: list[Fold]
    test: list[str]
    groups: dict[str, str]

    def fold(self, k: int) -> Fold:
        if not 0 <= k < len(self.folds):
            raise ConfigError(f"fold {k} does not exist: the split has {len(self.folds)} folds")
        return self.folds[k]

    def to_json(self) -> dict:
        return {
            "folds": [{"train": f.train, "val": f.val} for f in self.folds],
            "test": self.test,
            "groups": self.groups,
        }


def make_split(groups: dict[str, str], k: int, seed: int, test_fraction: float) -> Split:
    """Split cases {case_id: group_id} into a held-out test set and k folds, grouped.

    Groups are shuffled with the seed; the first ceil(test_fraction * n_groups) go to test; the
    rest are dealt, largest first, to the fold with the fewest cases so folds stay balanced.
    """
    members: dict[str, list[str]] = defaultdict(list)
    for case, group in sorted(groups.items()):
        members[group].append(case)
    names = sorted(members)
    if len(names) < k + 1:
        raise ConfigError(f"split.k={k} needs at least {k + 1} groups (k folds + test); found {len(names)}")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n_test = min(max(1, int(np.ceil(test_fraction * len(names)))), len(names) - k)
    test_groups, fold_groups = order[:n_test], order[n_test:]

    fold_cases: list[list[str]] = [[] for _ in range(k)]
    # Stable sort keeps the seeded order among groups of equal size.
    for group in sorted(fold_groups, key=lambda g: -len(members[g])):
        smallest = min(range(k), key=lambda i: len(fold_cases[i]))
        fold_cases[smallest].extend(members[group])

    folds = [
        Fold(train=sorted(c for j, cases in enumerate(fold_cases) if j != i for c in cases), val=sorted(val))
        for i, val in enumerate(fold_cases)
    ]
    test = sorted(c for g in test_groups for c in members[g])
    return Split(folds=folds, test=test, groups=dict(sorted(groups.items())))


def read_split(path: Path) -> Split:
    data = json.loads(Path(path).read_text())
    return Split(
        folds=[Fold(train=f["train"], val=f["val"]) for f in data["folds"]],
        test=data["test"],
        groups=data["groups"],
    )
