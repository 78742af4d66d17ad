"""Ensembling: the weighted mean of the members' (folds' and architectures') probabilities, cut into
masks by per-class thresholds tuned on the members' out-of-fold validation predictions.

Each case of a member store has a `role` attr: `test` (held out, predicted by every member) or
`val` (predicted by the one fold of each architecture that did not train on it); a store without
roles is all test. The ensemble store holds the test cases only. Work goes block by block, all
classes at once: a batch of frames of a video, a band of chunk rows of an image, so memory holds a
few blocks, never a whole video or a whole 29-class X-ray in float32, and every block is read and
written in whole chunks (the output is laid out in one shard per block: no shard is rewritten).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from segpipe.atomic import Owner, atomic_dir
from segpipe.config import EnsembleConfig
from segpipe.ensemble_core import cut, weighted_mean
from segpipe.errors import StoreError
from segpipe.progress import tracked
from segpipe.store import CaseStore, labelled_frames
from segpipe.thresholds import bin_lookup, candidates, choose, dice_curves, fixed_choice, histograms

TEST, VAL = "test", "val"


def normalised(weights: np.ndarray) -> np.ndarray:
    """Weights summing to 1; all zero (no member better than another) means equal weights."""
    total = weights.sum()
    return weights / total if total > 0 else np.full(len(weights), 1 / len(weights))


def role_cases(store: CaseStore) -> dict[str, list[str]]:
    roles: dict[str, list[str]] = {TEST: [], VAL: []}
    for case_id in store.case_ids():
        role = store.case_attrs(case_id).get("role", TEST)
        if role not in roles:
            raise StoreError(f"{store.path}: case {case_id!r} has role {role!r}; expected {TEST!r} or {VAL!r}")
        roles[role].append(case_id)
    return roles


def val_dice_of(store: CaseStore) -> float:
    value = store.attrs.get("model", {}).get("val_dice")
    if not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise StoreError(
            f"{store.path}: attrs model.val_dice is {value!r}; weighting by val_dice needs a Dice in [0, 1]"
        )
    return float(value)


@dataclass(frozen=True)
class Members:
    """The member stores, their cases by role, and their weights in the mean."""

    stores: list[CaseStore]
    roles: list[dict[str, list[str]]]
    weights: np.ndarray

    @classmethod
    def open(cls, paths: list[Path], weighting: str) -> Members:
        stores = [CaseStore(p) for p in paths]
        if not stores:
            raise StoreError("no prediction stores to ensemble")
        roles = [role_cases(s) for s in stores]
        first = stores[0]
        for store, role in zip(stores[1:], roles[1:]):
            if store.classes != first.classes:
                raise StoreError(f"{store.path}: classes {store.classes} differ from {first.classes} in {first.path}")
            if role[TEST] != roles[0][TEST]:
                here, there = set(role[TEST]), set(roles[0][TEST])
                raise StoreError(
                    f"{store.path}: test cases differ from {first.path}: "
                    f"only here {sorted(here - there)[:5]}, only there {sorted(there - here)[:5]}"
                )
        if not roles[0][TEST]:
            raise StoreError(f"{first.path}: no test cases to ensemble")
        dice = np.ones(len(stores)) if weighting == "mean" else np.array([val_dice_of(s) for s in stores])
        return cls(stores, roles, normalised(dice))

    @property
    def classes(self) -> list[str]:
        return self.stores[0].classes

    @property
    def test_cases(self) -> list[str]:
        return self.roles[0][TEST]

    def val_holders(self) -> dict[str, list[int]]:
        """Each validation case and the indices of the members that predicted it out of fold."""
        holders: dict[str, list[int]] = defaultdict(list)
        for i, roles in enumerate(self.roles):
            for case_id in roles[VAL]:
                holders[case_id].append(i)
        return dict(sorted(holders.items()))

    def describe(self) -> list[dict[str, Any]]:
        """Each member's store, checkpoint (arch, fold, val Dice) and weight, for the report."""
        models = [s.attrs.get("model", {}) for s in self.stores]
        return [
            {"store": str(s.path), **{k: m.get(k) for k in ("arch", "fold", "val_dice")}, "weight": float(w)}
            for s, m, w in zip(self.stores, models, self.weights)
        ]


def prob_arrays(stores: list[CaseStore], case_id: str) -> tuple[list[zarr.Array], bool]:
    """Every store's `prob` array of a case, checked to share one shape, and whether the case is a video."""
    arrays = [s.array(case_id, "prob") for s in stores]
    for store, array in zip(stores[1:], arrays[1:]):
        if array.shape != arrays[0].shape:
            raise StoreError(
                f"{store.path}: case {case_id!r} prob shape {array.shape} "
                f"differs from {arrays[0].shape} in {stores[0].path}"
            )
    return arrays, stores[0].is_video(case_id)


def blocks(array: zarr.Array, video: bool, batch_frames: int) -> Iterator[tuple[slice, slice]]:
    """(frames, rows) slices covering a (T, K, H, W) video `batch_frames` frames at a time, or a
    (K, H, W) image, seen as one frame, one chunk row at a time (29 classes x 512 rows x 2048 px in
    float32 are 121 MB)."""
    if video:
        for f in range(0, array.shape[0], batch_frames):
            yield slice(f, min(f + batch_frames, array.shape[0])), slice(None)
        return
    height, step = array.shape[-2], array.chunks[-2]
    for r in range(0, height, step):
        yield slice(0, 1), slice(r, min(r + step, height))


def read_block(array: zarr.Array, video: bool, frames: slice, rows: slice) -> np.ndarray:
    """A (B, K, h, W) block, every class; an image is one frame."""
    return array[frames, :, rows] if video else array[:, rows][None]


def write_block(array: zarr.Array, video: bool, frames: slice, rows: slice, block: np.ndarray) -> None:
    if video:
        array[frames, :, rows] = block
    else:
        array[:, rows] = block[0]


def mean_block(arrays: list[zarr.Array], weights: np.ndarray, video: bool, frames: slice, rows: slice) -> np.ndarray:
    """The weighted mean of one block of every array, as float16 (what is stored and thresholded)."""
    return weighted_mean((read_block(array, video, frames, rows) for array in arrays), weights)


def val_histograms(members: Members, labels: CaseStore, case_id: str, holders: list[int], lookup: np.ndarray,
                   batch_frames: int) -> np.ndarray:
    """(labelled frames, K, 2, bins) threshold histograms of one validation case's out-of-fold mean."""
    arrays, video = prob_arrays([members.stores[i] for i in holders], case_id)
    mask = labels.array(case_id, "mask")
    if mask.shape != arrays[0].shape:
        raise StoreError(
            f"{labels.path}: case {case_id!r} mask shape {mask.shape} differs from the predictions' {arrays[0].shape}"
        )
    weights = normalised(members.weights[holders])
    keep = labelled_frames(labels, case_id)
    out = np.zeros((len(keep), len(members.classes), 2, int(lookup.max()) + 1), dtype=np.int64)
    for frames, rows in blocks(arrays[0], video, batch_frames):
        kept = np.flatnonzero((keep >= frames.start) & (keep < frames.stop))
        if kept.size:
            local = keep[kept] - frames.start
            prob = mean_block(arrays, weights, video, frames, rows)[local]
            # Pixel counts add up: an image's row bands sum into its one frame.
            out[kept] += histograms(prob, read_block(mask, video, frames, rows)[local], lookup)
    return out


def tune_thresholds(members: Members, labels: CaseStore | None, cfg: EnsembleConfig) -> list[dict[str, Any]]:
    """Per class: the threshold, where it came from, and the validation Dice at it and at the fixed one."""
    n_classes, holders = len(members.classes), members.val_holders()
    if not cfg.tune or not holders:
        return [fixed_choice(cfg.threshold, "tuning off" if not cfg.tune else "no validation cases")] * n_classes
    if labels is None:
        raise StoreError(f"{members.stores[0].path}: validation cases to tune on, but no labels store given")
    if labels.classes != members.classes:
        raise StoreError(f"{labels.path}: classes {labels.classes} differ from the predictions' {members.classes}")
    grid = candidates(cfg.grid_step, cfg.threshold)
    lookup = bin_lookup(grid)
    hist = np.concatenate([
        val_histograms(members, labels, case_id, idx, lookup, cfg.batch_frames) for case_id, idx in holders.items()
    ])
    if not len(hist):  # every validation frame untrusted (keep): no evidence either way
        return [fixed_choice(cfg.threshold, "no labelled validation frames")] * n_classes
    positives, dice = dice_curves(hist)
    return choose(grid, dice, positives, cfg.threshold)


def write_ensemble_case(members: Members, ensemble: CaseStore, case_id: str, thresholds: np.ndarray,
                        batch_frames: int) -> None:
    arrays, video = prob_arrays(members.stores, case_id)
    ensemble.write_case(case_id, members.stores[0].case_attrs(case_id))
    # One shard per block: a batch of frames of a video, a chunk row (as the members') of an image.
    shape, band = arrays[0].shape, batch_frames if video else arrays[0].chunks[-2]
    prob_out = ensemble.create_banded(case_id, "prob", shape, "float16", video, band)
    mask_out = ensemble.create_banded(case_id, "mask", shape, "uint8", video, band)
    for frames, rows in blocks(arrays[0], video, batch_frames):
        prob = mean_block(arrays, members.weights, video, frames, rows)
        write_block(prob_out, video, frames, rows, prob)
        write_block(mask_out, video, frames, rows, cut(prob, thresholds))


def ensemble_stores(
    paths: list[Path], out: Path, cfg: EnsembleConfig, labels: CaseStore | None = None
) -> dict[str, Any]:
    """Write `prob` (float16 weighted mean) and `mask` (uint8, prob >= its class's threshold) for every
    test case of the members to a new store at `out`; return the weights and thresholds it records.

    `labels` (masks of the validation cases) is needed only to tune thresholds.
    """
    members = Members.open(paths, cfg.weighting)
    choices = tune_thresholds(members, labels, cfg)
    summary = {
        "weighting": cfg.weighting,
        "members": members.describe(),
        "thresholds": dict(zip(members.classes, choices)),
        "n_test_cases": len(members.test_cases),
        "n_val_cases": len(members.val_holders()),
    }
    write_ensemble(members, out, [c["threshold"] for c in choices], summary, cfg.batch_frames)
    return summary


def apply_ensemble(paths: list[Path], out: Path, recorded: dict[str, Any], batch_frames: int) -> Members:
    """The ensemble stage's mean and masks for new cases: every case of the member stores (predicted by
    the same checkpoints) with the weighting and thresholds the stage recorded (`recorded`: its
    reports/<dataset>/ensemble.json). The weights come from the members' val_dice again, as the stage
    computed them, and must equal the recorded ones: a retrained member makes the record stale."""
    members = Members.open(paths, recorded["weighting"])
    expected = np.array([m["weight"] for m in recorded["members"]])
    if expected.shape != members.weights.shape or not np.allclose(members.weights, expected, rtol=0, atol=1e-12):
        raise StoreError(f"{members.stores[0].path}: member weights {members.weights.tolist()} differ from the "
                         f"recorded {expected.tolist()}: a member was retrained since the ensemble stage ran")
    thresholds = [recorded["thresholds"][name]["threshold"] for name in members.classes]
    write_ensemble(members, out, thresholds, {"weighting": recorded["weighting"], "members": members.describe(),
                                              "thresholds": recorded["thresholds"]}, batch_frames)
    return members


def write_ensemble(members: Members, out: Path, thresholds: list[float], attrs: dict[str, Any],
                   batch_frames: int) -> None:
    """The ensemble store at `out` (written atomically): every test case's mean and masks, `attrs` in its root."""
    cuts = np.array(thresholds, dtype=np.float32)
    with atomic_dir(out, Owner("ensemble", members.stores[0].attrs["dataset"])) as tmp:
        ensemble = CaseStore.create(tmp, dataset=members.stores[0].attrs["dataset"], classes=members.classes, **attrs)
        for case_id in tracked(members.test_cases, f"ensemble {members.stores[0].attrs['dataset']}"):
            write_ensemble_case(members, ensemble, case_id, cuts, batch_frames)
