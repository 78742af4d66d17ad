"""The `ensemble` stage: the mean of every fold's and architecture's probabilities, thresholded."""
from __future__ import annotations

import argparse
from pathlib import Path

from segpipe.ensemble import ensemble_stores
from tasks import common


def build_parser() -> argparse.ArgumentParser:
    p = common.dataset_parser(__doc__)
    p.add_argument("--members", type=Path, nargs="*", help="default: every arch and fold of params' train section")
    p.add_argument("--out", type=Path, help="default: data/predictions/<dataset>/ensemble.zarr")
    return p


def main(ns: argparse.Namespace) -> None:
    params = common.params_of(ns)
    members = ns.members or [
        common.member_path(ns.dataset, arch, k) for arch in params.train.archs for k in params.train.folds
    ]
    out = ns.out or common.PREDICTIONS / ns.dataset / "ensemble.zarr"
    ensemble_stores(members, out, params.ensemble.threshold)
    print(f"ensemble {ns.dataset}: mean of {len(members)} members -> {out}")


if __name__ == "__main__":
    common.run(main, build_parser())
