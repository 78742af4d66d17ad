"""The `infer` stage: one trained fold predicts its validation cases (out-of-fold, role "val") and
the held-out test cases (role "test") into one Zarr store, on Dask workers."""
from __future__ import annotations

import argparse
from pathlib import Path

from segpipe.atomic import Owner
from segpipe.device import resolve_device
from segpipe.infer import predict_store
from segpipe.parallel import dask_client
from segpipe.plan_file import Plan
from segpipe.splits import read_split
from segpipe.store import CaseStore
from tasks import common


def build_parser() -> argparse.ArgumentParser:
    p = common.dataset_parser(__doc__, "images", "split", "plan", member=True)
    p.add_argument("--model", type=Path, help="default: models/<dataset>/<arch>/fold<k>/best.pt")
    p.add_argument("--out", type=Path, help="default: data/predictions/<dataset>/folds/<arch>/fold<k>.zarr")
    return p


def main(ns: argparse.Namespace) -> None:
    params = common.params_of(ns)
    images = CaseStore(ns.images or common.store_path(ns.dataset))
    owner = Owner("infer", images.attrs["dataset"])  # the data's dataset, as segpipe.infer marks its store
    out = common.output_dir(ns.out or common.member_path(ns.dataset, ns.arch, ns.fold), owner)
    device = str(resolve_device(params.device))
    checkpoint = ns.model or common.model_dir(ns.dataset, ns.arch, ns.fold) / "best.pt"
    split = read_split(ns.split or common.SPLITS / f"{ns.dataset}.json")
    infer = Plan(ns.plan or common.plan_path(ns.dataset)).infer_config(params.infer)
    roles = {**{case: "val" for case in split.fold(ns.fold).val}, **{case: "test" for case in split.test}}
    with dask_client(params.dask) as client:
        predict_store(checkpoint, images, roles, out, infer, device, client)
    print(f"infer {ns.dataset}/{ns.arch}/fold{ns.fold}: {len(roles) - len(split.test)} val + "
          f"{len(split.test)} test cases -> {out}")


if __name__ == "__main__":
    common.run(main, build_parser())
