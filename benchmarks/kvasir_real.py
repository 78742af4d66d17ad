"""Real Kvasir-SEG: 5-fold cross-validation of the training stage on the 300 real pairs in ../shared/data.

    python -m benchmarks.kvasir_real [--epochs 10] [--steps 20] [--size 256] [--batch 8]

Ingests ../shared/data/kvasir-seg with segpipe.ingest into a temporary Zarr store (Dask LocalCluster
of params.yaml), splits it into 5 grouped folds with segpipe.splits (each Kvasir image is its own
group; 1% is held out, as make_split always keeps a test set), and trains a UNet per fold at
256x256 with the recipe of params.yaml (train: loss, optimizer, schedule, channels; augment.kvasir),
only epochs, steps and batch from the arguments. The defaults fit a 20-minute CPU budget on the
2-core development machine: a 256 px step of 8 costs ~0.65 s of CPU, so 200 steps a fold ~130 s,
plus validation each epoch and loading; `cpu_s` counts this process, `ingest_wall_s` the Dask ingest.

Prints one JSON line: per-fold best validation Dice, and as the baseline from the same run the Dice
of predicting every pixel as polyp on the same validation images.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from segpipe import augment
from segpipe.config import load_params
from segpipe.data import training_set, validation_batches
from segpipe.device import resolve_device
from segpipe.ingest import ingest
from segpipe.metrics import mean_dice
from segpipe.parallel import dask_client
from segpipe.splits import make_split
from segpipe.store import CaseStore
from segpipe.train import fit, new_model

RAW = ROOT.parent / "shared" / "data" / "kvasir-seg"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raw", type=Path, default=RAW)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="batches per epoch")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--folds", type=int, default=5)
    args = p.parse_args()
    if not (args.raw / "images").is_dir():
        sys.exit(f"error: {args.raw}: no Kvasir-SEG layout (images/, masks/) here")

    params = load_params(ROOT / "params.yaml")
    data = params.dataset("kvasir").model_copy(update={"image_size": (args.size, args.size), "tile_scale": None})
    cfg = params.train.model_copy(update={
        "epochs": args.epochs, "steps_per_epoch": args.steps, "batch_size": args.batch, "per_dataset": {},
    })
    device = resolve_device(params.device)
    kvasir_augment = augment.build(params.augment.for_dataset("kvasir"))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with dask_client(params.dask) as client:
            report = ingest("kvasir", args.raw, tmp / "kvasir.zarr", params.ingest, client)
        ingest_s = time.perf_counter() - wall0
        store = CaseStore(tmp / "kvasir.zarr")
        groups = {c: store.case_attrs(c)["group"] for c in store.case_ids()}
        split = make_split(groups, k=args.folds, seed=params.split.seed, test_fraction=0.01)
        meta = {"arch": "unet", "dataset": "kvasir", "classes": store.classes, "in_channels": data.in_channels,
                "image_size": [args.size, args.size], "channels": list(cfg.channels)}
        dice, baseline = [], []
        for k, fold in enumerate(split.folds):
            train = training_set(store, store, fold.train, data, cfg.foreground_fraction, kvasir_augment)
            val = validation_batches(store, store, fold.val, data, cfg.batch_size)
            out = tmp / f"fold{k}"
            out.mkdir()
            result = fit(new_model({**meta, "fold": k}, cfg.seed), train, val, cfg, out, device, {**meta, "fold": k})
            dice.append(round(result.best_dice, 4))
            masks = np.concatenate([y.numpy() for _, y in val])
            baseline.append(round(mean_dice(np.ones_like(masks), masks), 4))
    print(json.dumps({
        "benchmark": "kvasir_real", "cases": len(groups), "ingested": report.ingested, "folds": args.folds,
        "held_out": len(split.test), "image_size": args.size, "epochs": args.epochs, "steps_per_epoch": args.steps,
        "batch": args.batch, "augment": kvasir_augment is not None, "device": str(device),
        "torch_threads": torch.get_num_threads(), "val_dice_per_fold": dice, "mean_val_dice": round(float(np.mean(dice)), 4),
        "baseline_all_polyp_dice_per_fold": baseline, "ingest_wall_s": round(ingest_s, 1),
        "cpu_s": round(time.process_time() - cpu0, 1), "wall_s": round(time.perf_counter() - wall0, 1),
    }))


if __name__ == "__main__":
    main()
