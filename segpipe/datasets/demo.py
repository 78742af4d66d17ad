"""The embedded demo: synthetic data written in the three REAL raw layouts, so the real readers
ingest demo and real data alike and `dvc repro` runs end to end on a fresh clone.

    <out>/kvasir/{images,masks}/<id>.jpg, kavsir_bboxes.json       (demo_kvasir)
    <out>/usc_timit/<SPK>/mri/<SPK>_<n>.avi                        (demo_usc)
    <out>/usc_timit_truth/<SPK>/<SPK>_<n>.npy   true airway masks, outside the raw layout
    <out>/hand_xray/{train,test}/DCM/IDxxx/*.png, train/outputs_json/IDxxx/*.json  (demo_hand)

Deterministic: every case draws from its own `numpy.random.default_rng([seed, dataset, case])`
stream, so equal configs give byte-identical files and growing a count leaves existing cases as
they were.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from segpipe.atomic import Owner, atomic_dir
from segpipe.config import DemoConfig
from segpipe.datasets import demo_hand, demo_kvasir, demo_usc

log = logging.getLogger(__name__)


def generate(out: Path, cfg: DemoConfig) -> None:
    """Write the whole demo to `out`, atomically: a killed run leaves no half-written demo."""
    start = time.perf_counter()
    with atomic_dir(Path(out), Owner("demo")) as tmp:
        demo_kvasir.write(tmp, cfg.kvasir, cfg.seed)
        demo_usc.write(tmp, cfg.usc_timit, cfg.seed)
        demo_hand.write(tmp, cfg.hand_xray, cfg.seed)
    log.info("demo written to %s in %.1f s", out, time.perf_counter() - start)
