"""The `train` stage: one fold of one architecture on one dataset.

An unfinished run (killed, or failed) keeps its checkpoints in .<out name>.partial.tmp beside --out,
and the next run resumes it from its last finished epoch when it was made from the same settings,
input data (images, labels, split fold) and code; otherwise it says why and starts at epoch 0. So
`dvc repro`, or a retry of it, carries on a killed stage by itself."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dvclive import Live

from segpipe import augment, models
from segpipe.atomic import Owner, resumable_dir
from segpipe.config import DatasetAugment, DatasetConfig
from segpipe.data import training_set, validation_batches
from segpipe.device import resolve_device
from segpipe.plan_file import Plan
from segpipe.progress import Progress
from segpipe.splits import Fold, read_split
from segpipe.store import CaseStore
from segpipe.train import files_digest, fit, folder_digest, new_model
from tasks import common

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("segpipe", "tasks")


def build_parser() -> argparse.ArgumentParser:
    p = common.dataset_parser(__doc__, "images", "labels", "split", "plan", member=True)
    p.add_argument("--out", type=Path, help="default: models/<dataset>/<arch>/fold<k>")
    p.add_argument("--metrics", type=Path, help="DVCLive folder; default: reports/<dataset>/train/<arch>-fold<k>")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--resume", action="store_true",
        help="require resuming the unfinished run: fail, saying why, unless it exists and was made from the same "
        "settings, inputs and code (default: resume it when so, else start at epoch 0)",
    )
    start.add_argument("--fresh", action="store_true", help="discard any unfinished run and start at epoch 0")
    return p


def code_digest() -> str:
    """Digest of the project modules this process imported: the stage's code deps in dvc.yaml
    (tests/test_dvc_deps.py holds those equal to its imports), so a checkpoint of edited code is not
    resumed (a run killed to fix a bug would otherwise carry the bug on)."""
    files = {Path(m.__file__).resolve() for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
    return files_digest((f for f in files if any(f.is_relative_to(ROOT / pkg) for pkg in PACKAGES)), ROOT)


def run_inputs(images: CaseStore, labels: CaseStore, fold: Fold, data_cfg: DatasetConfig,
               aug: DatasetAugment) -> dict[str, Any]:
    """What a run is made from besides its train config and model meta: a resumed run must share it."""
    return {
        "images": folder_digest(images.path), "labels": folder_digest(labels.path),
        "train_cases": list(fold.train), "val_cases": list(fold.val),
        "dataset": data_cfg.model_dump(mode="json"), "augment": aug.model_dump(mode="json"), "code": code_digest(),
    }


def main(ns: argparse.Namespace) -> None:
    params = common.params_of(ns)
    owner = Owner("train", ns.dataset)
    out = common.output_dir(ns.out or common.model_dir(ns.dataset, ns.arch, ns.fold), owner)
    metrics_dir = common.output_folder(ns.metrics or common.REPORTS / ns.dataset / "train" / f"{ns.arch}-fold{ns.fold}")
    plan = Plan(ns.plan or common.plan_path(ns.dataset))
    data_cfg, cfg = plan.dataset_config(params.dataset(ns.dataset)), plan.train_config(params.train)
    models.check_input_size(ns.arch, cfg.channels, data_cfg.image_size)
    images = CaseStore(ns.images or common.store_path(ns.dataset))
    labels = CaseStore(ns.labels or common.labels_path(ns.dataset))
    fold = read_split(ns.split or common.SPLITS / f"{ns.dataset}.json").fold(ns.fold)
    aug_cfg = plan.augment()
    aug = augment.build(aug_cfg)
    train = training_set(images, labels, fold.train, data_cfg, cfg.foreground_fraction, aug)
    val = validation_batches(images, labels, fold.val, data_cfg, cfg.batch_size)

    meta = {
        "arch": ns.arch, "dataset": ns.dataset, "fold": ns.fold, "classes": labels.classes,
        "in_channels": data_cfg.in_channels, "image_size": list(data_cfg.image_size), "channels": list(cfg.channels),
        "encoder": cfg.encoder, "tile_scale": data_cfg.tile_scale, "res_units": cfg.res_units,
    }
    model = new_model(meta, cfg.seed, cfg.encoder_weights)
    inputs = run_inputs(images, labels, fold, data_cfg, aug_cfg)
    resume = "require" if ns.resume else "never" if ns.fresh else "auto"
    with (
        resumable_dir(out, resume != "never", owner) as work,
        # Always started empty: a resumed fit replays the earlier epochs' metrics into it.
        Live(str(metrics_dir), save_dvc_exp=False, dvcyaml=None) as live,
        Progress(f"train {ns.dataset}/{ns.arch}/fold{ns.fold}", None, unit="step") as steps,
    ):
        def progress(done: int, total: int) -> None:
            if steps.total != total:
                steps.set_total(total)
            steps.update(done - steps.done)

        result = fit(
            model, train, val, cfg, work, resolve_device(params.device), meta,
            tracker=live, resume=resume, progress=progress, inputs=inputs,
        )
        live.summary.update({"best_epoch": result.best_epoch, "best_val_dice": result.best_dice})
    resumed = f", resumed after epoch {result.resumed_from}" if result.resumed_from is not None else ""
    print(
        f"train {ns.dataset}/{ns.arch}/fold{ns.fold}: {len(train)} train samples, augment {aug is not None}; "
        f"best val dice {result.best_dice:.4f} at epoch {result.best_epoch} of {result.epochs_run}{resumed} -> {out}"
    )


if __name__ == "__main__":
    common.run(main, build_parser())
