"""Export a dataset's trained ensemble as a MONAI bundle that runs without segpipe installed.

    python -m tasks.export --dataset kvasir --out DIR

Run it in the repo where the pipeline ran: it takes the members and thresholds the ensemble stage
recorded (reports/<dataset>/ensemble.json), their checkpoints under models/, the plan's test-time
flips and params.yaml's infer and ingest sections. DIR receives the bundle (segpipe/export.py); it
is replaced only when it holds an earlier export of the same dataset.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from segpipe.atomic import Owner
from segpipe.export import export_bundle
from segpipe.plan_file import Plan
from tasks import common
from tasks.predict import trained_ensemble


def build_parser() -> argparse.ArgumentParser:
    p = common.dataset_parser(__doc__, "plan")
    p.add_argument("--out", type=Path, required=True, help="bundle folder")
    p.add_argument("--report", type=Path, help="the ensemble's record (default: reports/<dataset>/ensemble.json)")
    return p


def main(ns: argparse.Namespace) -> None:
    for name in ("onnxscript", "onnx_ir"):  # the ONNX exporter's passes log every step at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    params = common.params_of(ns)
    out = common.output_dir(ns.out, Owner("export", ns.dataset))
    trained = trained_ensemble(ns.dataset, ns.report or common.REPORTS / ns.dataset / "ensemble.json")
    infer = Plan(ns.plan or common.plan_path(ns.dataset)).infer_config(params.infer)
    members = export_bundle(ns.dataset, trained.checkpoints, trained.recorded, out, infer, params.ingest.chunk)
    onnx = sum(m["onnx"] is not None for m in members)
    print(f"export {ns.dataset}: {len(members)} members as TorchScript, {onnx} as ONNX -> {out}")
    for member in members:
        if member["onnx_skipped"]:
            print(f"no ONNX for {member['name']}: {member['onnx_skipped']}")


if __name__ == "__main__":
    common.run(main, build_parser())
