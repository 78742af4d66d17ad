"""The `ingest` stage: one dataset's raw layout -> its Zarr store, plus a JSON report.

    python -m tasks.ingest --dataset kvasir [--raw DIR] [--out STORE.zarr] [--report FILE.json]

Defaults: raw from params `datasets.<name>.raw`, out `data/interim/<name>.zarr`,
report `reports/<name>/ingest.json`. The error policy is params `ingest.on_error`; the Dask
cluster is params `dask` (a LocalCluster, or a running scheduler's address). An existing store at
`out` is updated incrementally: only new and changed files are decoded, removed ones dropped.
Nothing else at `out` is ever replaced: an `out` that is, lies in or holds `raw`, a folder or file
of the user's, or another dataset's or stage's store is refused, before any work.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from segpipe.atomic import Owner, write_json
from segpipe.ingest import ingest
from segpipe.parallel import dask_client
from tasks import common


def build_parser() -> argparse.ArgumentParser:
    p = common.dataset_parser("Ingest one dataset's raw layout into its Zarr store.")
    p.add_argument("--raw", type=Path, help="raw layout root (default: params datasets.<name>.raw)")
    p.add_argument("--out", type=Path, help="store to write (default: data/interim/<name>.zarr)")
    p.add_argument("--report", type=Path, help="report JSON (default: reports/<name>/ingest.json)")
    return p


def main(ns: argparse.Namespace) -> None:
    params = common.params_of(ns)
    raw = ns.raw or params.dataset(ns.dataset).raw
    out = ns.out or common.store_path(ns.dataset)
    common.apart_from_input(out, raw)
    common.output_dir(out, Owner("ingest", ns.dataset))
    report_path = common.output_file(ns.report or common.REPORTS / ns.dataset / "ingest.json")
    with dask_client(params.dask) as client:
        report = ingest(ns.dataset, raw, out, params.ingest, client)
    write_json(report_path, report.to_json())
    print(f"ingest {ns.dataset}: {report.summary()} -> {out}")


if __name__ == "__main__":
    common.run(main, build_parser())
