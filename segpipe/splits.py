"""Leakage-free, stratified K-fold splits: whole groups (speaker, patient, video) go to one fold or
to the test set, and the folds and the test set each get their share of every stratum.

A stratum is a coarse property of a case that the evaluation should see in every fold, e.g. the
polyp's size (mask-area bins) or how many classes a case shows. Datasets without one have a
single stratum, and the split only balances sizes.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segpipe.errors import ConfigError
from segpipe.store import CaseStore, frames_of


@dataclass(frozen=True)
class Fold:
    train: list[str]
    val: list[str]


@dataclass(frozen=True)
class Split:
    folds: list[Fold]
    test: list[str]
    groups: dict[str, str]
    strata: dict[str, str] = field(default_factory=dict)

    def fold(self, k: int) -> Fold:
        if not 0 <= k < len(self.folds):
            raise ConfigError(f"fold {k} does not exist: the split has {len(self.folds)} folds")
        return self.folds[k]

    def to_json(self) -> dict:
        return {
            "folds": [{"train": f.train, "val": f.val} for f in self.folds],
            "test": self.test,
            "groups": self.groups,
            "strata": self.strata,
        }


def make_split(
    groups: dict[str, str], k: int, seed: int, test_fraction: float, strata: dict[str, str] | None = None,
    test_cases: list[str] | None = None,
) -> Split:
    """Split cases {case_id: group_id} into a held-out test set and k folds, grouped and stratified.

    `test_cases`, when given, are the test set (with every case of their groups), whatever
    test_fraction says, and the other groups are dealt to the folds alone.

    The test set's target share of every stratum is `test_fraction`, each fold's the rest over k.
    Groups are dealt largest first (equal sizes in seeded random order) to the bin furthest below
    its target in the group's own strata, then in cases overall, then in a seeded bin order. So
    the first k + 1 groups open every bin (the test set and each fold get at least one group),
    and with one stratum this is plain size balancing. `strata` maps cases to a stratum; missing
    cases share one.
    """
    members: dict[str, list[str]] = defaultdict(list)
    for case, group in sorted(groups.items()):
        members[group].append(case)
    unknown = sorted(set(test_cases or []) - set(groups))
    if unknown:
        raise ConfigError(f"split.test_list: {len(unknown)} case(s) not in the dataset, e.g. {unknown[:3]}")
    fixed = sorted({groups[c] for c in test_cases or []})
    names = sorted(set(members) - set(fixed))
    bins_dealt = k if fixed else k + 1
    if len(names) < bins_dealt:
        raise ConfigError(f"split.k={k} needs at least {bins_dealt} groups to deal (k folds"
                          f"{'' if fixed else ' + test'}); found {len(names)}")
    strata = {c: strata[c] for c in sorted(groups) if c in strata} if strata else {}
    levels = sorted({strata.get(c, "") for c in groups})
    count = {g: np.array([sum(strata.get(c, "") == s for c in members[g]) for s in levels]) for g in names}
    total = sum(count.values())
    # Bin 0 is the test set, unless it is fixed; then only the folds are dealt.
    share = np.array(([] if fixed else [test_fraction]) + [(1 - (0 if fixed else test_fraction)) / k] * k)

    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    bin_rank = rng.permutation(bins_dealt)
    load = np.zeros((bins_dealt, len(levels)))
    bins: list[list[str]] = [[] for _ in range(bins_dealt)]
    # Stable sort keeps the seeded order among groups of equal size.
    for group in sorted(order, key=lambda g: -len(members[g])):
        mine = count[group]
        own_fill = (load * mine).sum(axis=1) / (share * (total * mine).sum())
        overall_fill = load.sum(axis=1) / (share * total.sum())
        best = min(range(bins_dealt), key=lambda b: (own_fill[b], overall_fill[b], bin_rank[b]))
        load[best] += mine
        bins[best].append(group)
    if fixed:
        bins.insert(0, fixed)

    cases = [sorted(c for g in gs for c in members[g]) for gs in bins]
    folds = [
        Fold(train=sorted(c for j, val in enumerate(cases[1:]) if j != i for c in val), val=val)
        for i, val in enumerate(cases[1:])
    ]
    return Split(folds=folds, test=cases[0], groups=dict(sorted(groups.items())), strata=strata)


def strata_of(labels: CaseStore, case_ids: list[str], how: str, bins: int = 3) -> dict[str, str]:
    """A stratum per case from its masks: "none" (no strata), "mask_area" (`bins` quantile bins of
    the foreground fraction, e.g. small/medium/large polyps) or "class_count" (classes present)."""
    if how == "none":
        return {}

    def masks(case_id: str) -> np.ndarray:  # read one case at a time: a hand's masks are 121 MB
        return frames_of(labels.read(case_id, "mask"), labels.is_video(case_id))

    if how == "class_count":
        return {c: f"{int(masks(c).any(axis=(0, 2, 3)).sum())}_classes" for c in case_ids}
    if how == "mask_area":
        area = {c: float(masks(c).any(axis=1).mean()) for c in case_ids}
        edges = np.quantile(list(area.values()), np.linspace(0, 1, bins + 1)[1:-1]) if area else []
        return {c: f"area_bin{int(np.searchsorted(edges, a, side='right'))}" for c, a in area.items()}
    raise ConfigError(f"split.stratify: unknown stratification {how!r}; known: none, mask_area, class_count")


def read_split(path: Path) -> Split:
    data = json.loads(Path(path).read_text())
    return Split(
        folds=[Fold(train=f["train"], val=f["val"]) for f in data["folds"]],
        test=data["test"],
        groups=data["groups"],
        strata=data.get("strata", {}),
    )
