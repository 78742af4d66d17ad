"""The `evaluate` stage: the ensemble and each of its members on the held-out test cases, per case,
class and frame (Dice, IoU, precision, recall, HD95, NSD), and a report to act on.

Writes into --out (default reports/<dataset>): metrics.json (DVC metrics), per_case.csv,
per_class.csv and per_frame.csv (DVC plots), report.html (self-contained), report.md and figures/.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from segpipe.atomic import Owner, write_json
from segpipe.evaluate import evaluate_ensemble, score_vs_truth
from segpipe.evaluate_report import FIGURES, Stores, report_blocks, write_report
from segpipe.evaluate_tables import csv_text, metrics_json, per_case_rows, per_class_rows, per_frame_rows, write_text
from segpipe.splits import read_split
from segpipe.store import CaseStore
from tasks import common

FILES = ("metrics.json", "per_case.csv", "per_class.csv", "per_frame.csv", "report.html", "report.md")


def build_parser() -> argparse.ArgumentParser:
    p = common.dataset_parser(__doc__, "images", "labels", "split")
    p.add_argument("--predictions", type=Path, help="default: data/predictions/<dataset>/ensemble.zarr")
    p.add_argument("--members", type=Path, nargs="*", help="default: every arch and fold of params' train section")
    p.add_argument("--out", type=Path, help="folder of the evaluation's files (default: reports/<dataset>)")
    return p


def main(ns: argparse.Namespace) -> None:
    params = common.params_of(ns)
    cfg, data_cfg = params.evaluate, params.dataset(ns.dataset)
    folder = ns.out or common.REPORTS / ns.dataset
    for name in FILES:
        common.output_file(folder / name)
    common.output_dir(folder / FIGURES, Owner("evaluate", ns.dataset))
    ensemble = CaseStore(ns.predictions or common.PREDICTIONS / ns.dataset / "ensemble.zarr")
    labels = CaseStore(ns.labels or common.labels_path(ns.dataset))
    images = CaseStore(ns.images or common.store_path(ns.dataset))
    members = ns.members or [
        common.member_path(ns.dataset, arch, k) for arch in params.train.archs for k in params.train.folds
    ]
    cases = read_split(ns.split or common.SPLITS / f"{ns.dataset}.json").test

    ev = evaluate_ensemble(ensemble, labels, [CaseStore(m) for m in members], cases, cfg.surface_tolerance_px)
    if data_cfg.truth is not None:
        ev = replace(ev, vs_truth=score_vs_truth(ensemble, images, cases, data_cfg.truth, cfg.surface_tolerance_px))
    metrics = metrics_json(ev, len(cases))
    fps = {c: images.case_attrs(c)["fps"] for c in cases if images.is_video(c)}
    blocks = report_blocks(ns.dataset, ev, metrics, Stores(images, labels, ensemble), cfg, fps)

    for name, rows in (("per_case.csv", per_case_rows(ev)), ("per_class.csv", per_class_rows(ev)),
                       ("per_frame.csv", per_frame_rows(ev, fps))):
        write_text(folder / name, csv_text(rows))
    write_report(folder, ns.dataset, blocks)
    write_json(folder / "metrics.json", metrics)
    headline = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    truth = f", vs truth dice {metrics['vs_truth']['dice']:.4f}" if "vs_truth" in metrics else ""
    print(f"evaluate {ns.dataset}: {json.dumps(headline)}{truth} -> {folder}/report.html")


if __name__ == "__main__":
    common.run(main, build_parser())
