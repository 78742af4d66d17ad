"""The `evaluate` stage: Dice, IoU, precision and recall of the ensemble on the test cases."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from segpipe.atomic import write_json
from segpipe.evaluate import pairs_vs_store, pairs_vs_truth, score_pairs
from segpipe.splits import read_split
from segpipe.store import CaseStore
from tasks import common


def build_parser() -> argparse.ArgumentParser:
    p = common.dataset_parser(__doc__, "images", "labels", "split")
    p.add_argument("--predictions", type=Path, help="default: data/predictions/<dataset>/ensemble.zarr")
    p.add_argument("--out", type=Path, help="default: reports/<dataset>/metrics.json")
    return p


def main(ns: argparse.Namespace) -> None:
    params = common.params_of(ns)
    data_cfg = params.dataset(ns.dataset)
    out = common.output_file(ns.out or common.REPORTS / ns.dataset / "metrics.json")
    pred = CaseStore(ns.predictions or common.PREDICTIONS / ns.dataset / "ensemble.zarr")
    labels = CaseStore(ns.labels or common.labels_path(ns.dataset))
    cases = read_split(ns.split or common.SPLITS / f"{ns.dataset}.json").test

    metrics = score_pairs(pairs_vs_store(pred, labels, cases), labels.classes)
    metrics["n_cases"] = len(cases)
    if data_cfg.truth is not None:
        images = CaseStore(ns.images or common.store_path(ns.dataset))
        metrics["vs_truth"] = score_pairs(pairs_vs_truth(pred, images, cases, data_cfg.truth), labels.classes)
    write_json(out, metrics)
    headline = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    truth = f", vs truth dice {metrics['vs_truth']['dice']:.4f}" if "vs_truth" in metrics else ""
    print(f"evaluate {ns.dataset}: {json.dumps(headline)}{truth} -> {out}")


if __name__ == "__main__":
    common.run(main, build_parser())
