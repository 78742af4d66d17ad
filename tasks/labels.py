"""The `labels` stage: a dataset's training masks, as given (ingest) or pseudo-labelled (USC-TIMIT)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from segpipe.atomic import write_json
from segpipe.labels import copy_labels
from segpipe.pseudolabel import pseudolabel_store
from segpipe.store import CaseStore
from tasks import common


def build_parser() -> argparse.ArgumentParser:
    p = common.dataset_parser(__doc__, "images")
    p.add_argument("--out", type=Path, help="default: data/labels/<dataset>.zarr")
    p.add_argument("--report", type=Path, help="default: reports/<dataset>/labels.json")
    return p


def main(ns: argparse.Namespace) -> None:
    params = common.params_of(ns)
    data_cfg = params.dataset(ns.dataset)
    images = CaseStore(ns.images or common.store_path(ns.dataset))
    out = ns.out or common.labels_path(ns.dataset)
    if data_cfg.labels == "pseudolabel":
        summary = pseudolabel_store(images, out, params.pseudolabel, truth=data_cfg.truth)
    else:
        summary = copy_labels(images, out)
    write_json(ns.report or common.REPORTS / ns.dataset / "labels.json", summary)
    print(f"labels {ns.dataset}: {json.dumps(summary)} -> {out}")


if __name__ == "__main__":
    common.run(main, build_parser())
