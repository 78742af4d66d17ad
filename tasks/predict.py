"""Predict new data with a dataset's trained ensemble (also `segpipe predict`).

    python -m tasks.predict --dataset kvasir --input PATH --out DIR [--on-error skip]

PATH is a folder in the dataset's raw layout (labels optional), one image or video file, or a
segpipe Zarr store. Run it in the repo where the pipeline ran: it uses the members and thresholds
that the ensemble stage recorded in reports/<dataset>/ensemble.json, their checkpoints under
models/, and the plan. DIR receives masks or label PNGs, overlays, predictions.csv, predict.json
and predictions.zarr (see segpipe/prediction_files.py); it is replaced only when it holds an
earlier prediction of the same dataset.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from segpipe.atomic import Owner
from segpipe.device import resolve_device
from segpipe.errors import ConfigError
from segpipe.parallel import dask_client
from segpipe.plan_file import Plan
from segpipe.predict import Trained, predict
from tasks import common


def build_parser() -> argparse.ArgumentParser:
    p = common.dataset_parser(__doc__, "plan")
    p.add_argument("--input", type=Path, required=True, help="raw layout folder, image or video file, or Zarr store")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="a bad input file: stop (default), or leave it out, list it in predict.json and go on")
    p.add_argument("--report", type=Path, help="the ensemble's record (default: reports/<dataset>/ensemble.json)")
    return p


def trained_ensemble(dataset: str, report: Path) -> Trained:
    """The members and thresholds the ensemble stage recorded, with their checkpoints."""
    try:
        recorded = json.loads(report.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{report}: not found; train the dataset first (dvc repro ensemble@{dataset})") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{report}: unreadable ensemble record ({exc})") from exc
    checkpoints = [common.model_dir(dataset, m["arch"], m["fold"]) / "best.pt" for m in recorded["members"]]
    for checkpoint in checkpoints:
        if not checkpoint.is_file():
            raise ConfigError(f"{checkpoint}: checkpoint of a member recorded in {report} not found")
    return Trained(dataset, checkpoints, recorded)


def main(ns: argparse.Namespace) -> None:
    params = common.params_of(ns)
    if not ns.input.exists():
        raise ConfigError(f"{ns.input}: no such file or folder to predict")
    common.apart_from_input(ns.out, ns.input)
    common.output_dir(ns.out, Owner("predict", ns.dataset))
    trained = trained_ensemble(ns.dataset, ns.report or common.REPORTS / ns.dataset / "ensemble.json")
    plan = Plan(ns.plan or common.plan_path(ns.dataset))
    ingest_cfg = params.ingest.model_copy(update={"on_error": ns.on_error})
    with dask_client(params.dask) as client:
        summary = predict(trained, ns.input, ns.out, ingest_cfg, plan.infer_config(params.infer), params.ensemble,
                          params.predict, str(resolve_device(params.device)), client)
    print(f"predict {ns.dataset}: {summary.line()} -> {ns.out}")
    for entry in summary.skipped:
        print(f"skipped {entry['source']}: {entry['reason']}")


if __name__ == "__main__":
    common.run(main, build_parser())
