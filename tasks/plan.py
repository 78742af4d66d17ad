"""The `plan` stage: a dataset's fingerprint and the training and inference settings derived from
it (segpipe/plan.py), written to plans/<dataset>.json for train, infer and ensemble.

    python -m tasks.plan --dataset kvasir [--images STORE.zarr] [--labels STORE.zarr] [--split FILE.json]

Only the cases of the cross-validation folds are fingerprinted: nothing of the test set shapes the recipe.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from segpipe.atomic import write_json
from segpipe.device import resolve_device
from segpipe.fingerprint import fingerprint
from segpipe.plan import make_plan
from segpipe.splits import read_split
from segpipe.store import CaseStore
from tasks import common


def build_parser() -> argparse.ArgumentParser:
    p = common.dataset_parser(__doc__, "images", "labels", "split")
    p.add_argument("--out", type=Path, help="default: plans/<dataset>.json")
    return p


def main(ns: argparse.Namespace) -> None:
    params = common.params_of(ns)
    out = common.output_file(ns.out or common.plan_path(ns.dataset))
    images = CaseStore(ns.images or common.store_path(ns.dataset))
    labels = CaseStore(ns.labels or common.labels_path(ns.dataset))
    split = read_split(ns.split or common.SPLITS / f"{ns.dataset}.json")
    cases = sorted(case for fold in split.folds for case in fold.val)
    plan = make_plan(fingerprint(images, labels, cases), params, ns.dataset, resolve_device(params.device))
    write_json(out, plan)
    summary = ", ".join(f"{key} {item['value']}" for key, item in plan["plan"].items()
                        if key in ("tile_scale", "image_size", "channels", "batch_size", "epochs"))
    print(f"plan {ns.dataset}: {len(cases)} cases fingerprinted; {summary} -> {out}")


if __name__ == "__main__":
    common.run(main, build_parser())
