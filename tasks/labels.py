"""The `labels` stage: a dataset's training masks, as given (ingest) or pseudo-labelled (USC-TIMIT).

    python -m tasks.labels --dataset usc_timit [--images STORE.zarr] [--out STORE.zarr]
        [--rounds-dir DIR] [--report FILE.json] [--quality DIR] [--truth DIR]

Pseudo-labels come with a quality report in `--quality` (pseudolabels.json, pseudolabels.md and a
montage PNG per video); any ingest store works, e.g. one of real clips ingested with `tasks.ingest`.
With params `pseudolabel.rounds` > 0, teacher-student rounds refine them (segpipe.teacher): every
round's store lies in `--rounds-dir`, and `--out` holds the last round's.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from segpipe.atomic import Owner, atomic_dir, write_json
from segpipe.device import resolve_device
from segpipe.labels import copy_labels
from segpipe.pseudolabel_report import write_report
from segpipe.store import CaseStore
from segpipe.teacher import link_store, refine
from tasks import common


def build_parser() -> argparse.ArgumentParser:
    p = common.dataset_parser(__doc__, "images")
    p.add_argument("--out", type=Path, help="default: data/labels/<dataset>.zarr")
    p.add_argument("--rounds-dir", type=Path,
                   help="every round's labels store, default: beside --out (data/labels/<dataset>.rounds)")
    p.add_argument("--report", type=Path, help="headline figures, default: reports/<dataset>/labels.json")
    p.add_argument("--quality", type=Path, help="quality report folder, default: reports/<dataset>/pseudolabels")
    p.add_argument("--truth", type=Path, help="true masks to score against (default: params datasets.<name>.truth)")
    return p


def main(ns: argparse.Namespace) -> None:
    params = common.params_of(ns)
    data_cfg = params.dataset(ns.dataset)
    images = CaseStore(ns.images or common.store_path(ns.dataset))
    owner = Owner("labels", images.attrs["dataset"])  # the data's dataset, as segpipe.labels marks its store
    out = common.output_dir(ns.out or common.labels_path(ns.dataset), owner)
    quality = common.output_dir(ns.quality or common.REPORTS / ns.dataset / "pseudolabels", owner)
    rounds_dir = common.output_dir(ns.rounds_dir or out.with_suffix(".rounds"), owner)
    report_path = common.output_file(ns.report or common.REPORTS / ns.dataset / "labels.json")
    if data_cfg.labels == "pseudolabel":
        rounds = refine(images, rounds_dir, params.pseudolabel, data_cfg, resolve_device(params.device))
        labels = link_store(rounds[-1], out)
        report = write_report(labels, images, quality, truth=ns.truth or data_cfg.truth, rounds=rounds,
                              title=f"Pseudo-label quality: {ns.dataset} ({images.path.name})")
        summary = {"origin": "pseudolabel", **report["summary"]}
    else:
        summary = copy_labels(images, out)
        _write_nothing_pseudolabelled(quality, rounds_dir, ns.dataset, summary, owner)
    write_json(report_path, summary)
    print(f"labels {ns.dataset}: {json.dumps(summary)} -> {out}")


def _write_nothing_pseudolabelled(folder: Path, rounds_dir: Path, dataset: str, summary: dict, owner: Owner) -> None:
    """The stage's quality and rounds folders exist for every dataset (DVC declares them per stage);
    these say that the masks were given."""
    with atomic_dir(rounds_dir, owner) as tmp:
        (tmp / "README.md").write_text(f"No pseudo-label rounds: the masks of {dataset} come with the data.\n")
    with atomic_dir(folder, owner) as tmp:
        write_json(tmp / "pseudolabels.json", {"pseudolabelled": False, **summary})
        (tmp / "pseudolabels.md").write_text(
            f"# Pseudo-label quality: {dataset}\n\nNothing is pseudo-labelled: the masks of the "
            f"{summary['cases']} labelled cases come with the data.\n"
        )


if __name__ == "__main__":
    common.run(main, build_parser())
