"""The `infer` stage: one trained fold predicts the held-out test cases into a Zarr store."""
from __future__ import annotations

import argparse
from pathlib import Path

from segpipe.device import resolve_device
from segpipe.infer import predict_store
from segpipe.splits import read_split
from segpipe.store import CaseStore
from segpipe.train import load_model
from tasks import common


def build_parser() -> argparse.ArgumentParser:
    p = common.dataset_parser(__doc__, "images", "split", member=True)
    p.add_argument("--model", type=Path, help="default: models/<dataset>/<arch>/fold<k>/best.pt")
    p.add_argument("--out", type=Path, help="default: data/predictions/<dataset>/folds/<arch>/fold<k>.zarr")
    return p


def main(ns: argparse.Namespace) -> None:
    params = common.params_of(ns)
    device = resolve_device(params.device)
    model, meta = load_model(ns.model or common.model_dir(ns.dataset, ns.arch, ns.fold) / "best.pt", device)
    images = CaseStore(ns.images or common.store_path(ns.dataset))
    cases = read_split(ns.split or common.SPLITS / f"{ns.dataset}.json").test
    out = ns.out or common.member_path(ns.dataset, ns.arch, ns.fold)
    predict_store(model, meta, images, cases, out, params.infer, device)
    print(f"infer {ns.dataset}/{ns.arch}/fold{ns.fold}: {len(cases)} cases -> {out}")


if __name__ == "__main__":
    common.run(main, build_parser())
