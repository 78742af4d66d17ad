"""The `train` stage: one fold of one architecture on one dataset."""
from __future__ import annotations

import argparse
from pathlib import Path

from dvclive import Live

from segpipe.atomic import atomic_dir
from segpipe.data import load_samples
from segpipe.device import resolve_device
from segpipe.splits import read_split
from segpipe.store import CaseStore
from segpipe.train import fit, new_model
from tasks import common


def build_parser() -> argparse.ArgumentParser:
    p = common.dataset_parser(__doc__, "images", "labels", "split", member=True)
    p.add_argument("--out", type=Path, help="default: models/<dataset>/<arch>/fold<k>")
    p.add_argument("--metrics", type=Path, help="DVCLive folder; default: reports/<dataset>/train/<arch>-fold<k>")
    return p


def main(ns: argparse.Namespace) -> None:
    params = common.params_of(ns)
    data_cfg, cfg = params.dataset(ns.dataset), params.train.for_dataset(ns.dataset)
    images = CaseStore(ns.images or common.store_path(ns.dataset))
    labels = CaseStore(ns.labels or common.labels_path(ns.dataset))
    fold = read_split(ns.split or common.SPLITS / f"{ns.dataset}.json").fold(ns.fold)
    size, in_channels = data_cfg.image_size, data_cfg.in_channels
    train = load_samples(images, labels, fold.train, size, in_channels)
    val = load_samples(images, labels, fold.val, size, in_channels)

    meta = {
        "arch": ns.arch, "dataset": ns.dataset, "fold": ns.fold, "classes": labels.classes,
        "in_channels": in_channels, "image_size": list(size), "channels": list(cfg.channels),
    }
    model = new_model(meta, cfg.seed)
    metrics_dir = ns.metrics or common.REPORTS / ns.dataset / "train" / f"{ns.arch}-fold{ns.fold}"
    out = ns.out or common.model_dir(ns.dataset, ns.arch, ns.fold)
    with atomic_dir(out) as tmp, Live(str(metrics_dir), save_dvc_exp=False, dvcyaml=None) as live:
        result = fit(model, train, val, cfg, tmp, resolve_device(params.device), meta, tracker=live)
        live.summary.update({"best_epoch": result.best_epoch, "best_val_dice": result.best_dice})
    print(
        f"train {ns.dataset}/{ns.arch}/fold{ns.fold}: {len(train[0])} train, {len(val[0])} val frames; "
        f"best val dice {result.best_dice:.4f} at epoch {result.best_epoch} of {result.epochs_run} -> {out}"
    )


if __name__ == "__main__":
    common.run(main, build_parser())
