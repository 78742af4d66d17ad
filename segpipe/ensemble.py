"""Ensembling: the mean of several prediction stores' probabilities, thresholded into masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from segpipe.atomic import atomic_dir
from segpipe.errors import StoreError
from segpipe.preprocess import to_float16, to_float32
from segpipe.store import CaseStore


def mean_probabilities(stores: list[CaseStore], case_id: str) -> np.ndarray:
    """Running float32 mean, so memory holds one member's output and the sum, whatever their number."""
    total = None
    for store in stores:
        prob = to_float32(store.array(case_id, "prob")[:])
        total = prob if total is None else total + prob
    return total / len(stores)


def ensemble_stores(members: list[Path], out: Path, threshold: float) -> None:
    """Write `prob` (float16 mean) and `mask` (uint8, prob >= threshold) for every case of the members."""
    stores = [CaseStore(p) for p in members]
    if not stores:
        raise StoreError(f"{out}: no prediction stores to ensemble")
    cases = stores[0].case_ids()
    for store in stores[1:]:
        if store.case_ids() != cases:
            raise StoreError(f"{store.path}: cases differ from {stores[0].path}")
    with atomic_dir(out) as tmp:
        ensemble = CaseStore.create(
            tmp, dataset=stores[0].attrs["dataset"], classes=stores[0].classes,
            members=[str(p) for p in members], threshold=threshold,
        )
        for case_id in cases:
            prob = mean_probabilities(stores, case_id)
            ensemble.write_case(case_id, stores[0].case_attrs(case_id))
            ensemble.write_array(case_id, "prob", to_float16(prob))
            ensemble.write_array(case_id, "mask", (prob >= threshold).astype(np.uint8))
