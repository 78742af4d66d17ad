"""The `ensemble` stage: the (validation-Dice-weighted) mean of every fold's and architecture's test
probabilities, cut by per-class thresholds tuned on their out-of-fold validation predictions."""
from __future__ import annotations

import argparse
from pathlib import Path

from segpipe.atomic import Owner, write_json
from segpipe.ensemble import ensemble_stores
from segpipe.plan_file import Plan
from segpipe.store import CaseStore
from tasks import common


def build_parser() -> argparse.ArgumentParser:
    p = common.dataset_parser(__doc__, "labels", "plan")
    p.add_argument("--members", type=Path, nargs="*", help="default: every arch and fold of params' train section")
    p.add_argument("--out", type=Path, help="default: data/predictions/<dataset>/ensemble.zarr")
    p.add_argument("--report", type=Path, help="weights and thresholds (default: reports/<dataset>/ensemble.json)")
    return p


def main(ns: argparse.Namespace) -> None:
    params = common.params_of(ns)
    cfg = Plan(ns.plan or common.plan_path(ns.dataset)).ensemble_config(params.ensemble)
    members = ns.members or [
        common.member_path(ns.dataset, arch, k) for arch in params.train.archs for k in params.train.folds
    ]
    owner = Owner("ensemble", CaseStore(members[0]).attrs["dataset"])  # as segpipe.ensemble marks its store
    out = common.output_dir(ns.out or common.PREDICTIONS / ns.dataset / "ensemble.zarr", owner)
    report = common.output_file(ns.report or common.REPORTS / ns.dataset / "ensemble.json")
    labels = CaseStore(ns.labels or common.labels_path(ns.dataset))
    summary = ensemble_stores(members, out, cfg, labels)
    write_json(report, summary)
    tuned = sum(c["source"] == "tuned" for c in summary["thresholds"].values())
    print(
        f"ensemble {ns.dataset}: {cfg.weighting} of {len(members)} members, {tuned}/{len(summary['thresholds'])} "
        f"thresholds tuned on {summary['n_val_cases']} validation cases -> {out}, {report}"
    )


if __name__ == "__main__":
    common.run(main, build_parser())
