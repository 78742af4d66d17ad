"""The `train` stage: one fold of one architecture on one dataset."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dvclive import Live

from segpipe import augment, models
from segpipe.atomic import Owner, resumable_dir
from segpipe.data import training_set, validation_batches
from segpipe.device import resolve_device
from segpipe.plan_file import Plan
from segpipe.progress import Progress
from segpipe.splits import read_split
from segpipe.store import CaseStore
from segpipe.train import fit, new_model
from tasks import common


def build_parser() -> argparse.ArgumentParser:
    p = common.dataset_parser(__doc__, "images", "labels", "split", "plan", member=True)
    p.add_argument("--out", type=Path, help="default: models/<dataset>/<arch>/fold<k>")
    p.add_argument("--metrics", type=Path, help="DVCLive folder; default: reports/<dataset>/train/<arch>-fold<k>")
    p.add_argument(
        "--resume", action="store_true",
        help="continue a killed run with the same settings from its last finished epoch; an unfinished run "
        "lives in .<out name>.partial.tmp beside --out until it completes",
    )
    return p


def drop_torn_live_summary(metrics_dir: Path) -> None:
    """DVCLive rewrites metrics.json in place every epoch, so a kill can leave it empty, and
    `Live(resume=True)` then fails to parse it. The resumed step comes from last.pt (segpipe.train.fit),
    not from this file, so an unreadable one is dropped; the next epoch writes it again."""
    path = metrics_dir / "metrics.json"
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        pass
    except ValueError:
        path.unlink()


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
    aug = augment.build(plan.augment())
    train = training_set(images, labels, fold.train, data_cfg, cfg.foreground_fraction, aug)
    val = validation_batches(images, labels, fold.val, data_cfg, cfg.batch_size)

    meta = {
        "arch": ns.arch, "dataset": ns.dataset, "fold": ns.fold, "classes": labels.classes,
        "in_channels": data_cfg.in_channels, "image_size": list(data_cfg.image_size), "channels": list(cfg.channels),
        "encoder": cfg.encoder, "tile_scale": data_cfg.tile_scale, "res_units": cfg.res_units,
    }
    model = new_model(meta, cfg.seed, cfg.encoder_weights)
    if ns.resume:
        drop_torn_live_summary(metrics_dir)
    with (
        resumable_dir(out, ns.resume, owner) as work,
        Live(str(metrics_dir), save_dvc_exp=False, dvcyaml=None, resume=ns.resume) as live,
        Progress(f"train {ns.dataset}/{ns.arch}/fold{ns.fold}", None, unit="step") as steps,
    ):
        def progress(done: int, total: int) -> None:
            if steps.total != total:
                steps.set_total(total)
            steps.update(done - steps.done)

        result = fit(
            model, train, val, cfg, work, resolve_device(params.device), meta,
            tracker=live, resume=ns.resume, progress=progress,
        )
        live.summary.update({"best_epoch": result.best_epoch, "best_val_dice": result.best_dice})
    resumed = f", resumed after epoch {result.resumed_from}" if result.resumed_from is not None else ""
    print(
        f"train {ns.dataset}/{ns.arch}/fold{ns.fold}: {len(train)} train samples, augment {aug is not None}; "
        f"best val dice {result.best_dice:.4f} at epoch {result.best_epoch} of {result.epochs_run}{resumed} -> {out}"
    )


if __name__ == "__main__":
    common.run(main, build_parser())
