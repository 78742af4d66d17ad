"""What every stage shares: default paths, params loading, offline settings, error reporting."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from segpipe.config import DATASET_NAMES, Params, load_params
from segpipe.errors import SegpipeError

PARAMS = Path("params.yaml")
INTERIM = Path("data/interim")
LABELS = Path("data/labels")
SPLITS = Path("data/splits")
PREDICTIONS = Path("data/predictions")
MODELS = Path("models")
REPORTS = Path("reports")

# Offline hygiene: no analytics or update checks from the libraries a stage imports.
OFFLINE_ENV = {
    "DO_NOT_TRACK": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)


def store_path(dataset: str) -> Path:
    return INTERIM / f"{dataset}.zarr"


def labels_path(dataset: str) -> Path:
    """Where a dataset's training masks live, given or pseudo-labelled (see segpipe.labels)."""
    return LABELS / f"{dataset}.zarr"


def model_dir(dataset: str, arch: str, fold: int) -> Path:
    return MODELS / dataset / arch / f"fold{fold}"


def member_path(dataset: str, arch: str, fold: int) -> Path:
    """One fold's predictions; all members of a dataset lie under one folder the ensemble depends on."""
    return PREDICTIONS / dataset / "folds" / arch / f"fold{fold}.zarr"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", type=Path, default=PARAMS, help="params.yaml to read (default: %(default)s)")
    return p


INPUT_HELP = {
    "images": "ingest store (default: data/interim/<dataset>.zarr)",
    "labels": "labels store (default: data/labels/<dataset>.zarr)",
    "split": "split JSON (default: data/splits/<dataset>.json)",
}


def dataset_parser(description: str, *inputs: str, member: bool = False) -> argparse.ArgumentParser:
    """A stage parser with --dataset, the standard input stores in `inputs`, and, for a stage of
    one ensemble member, --arch and --fold."""
    p = parser(description)
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    if member:
        p.add_argument("--arch", required=True)
        p.add_argument("--fold", type=int, required=True)
    for name in inputs:
        p.add_argument(f"--{name}", type=Path, help=INPUT_HELP[name])
    return p


def run(main: Callable[[argparse.Namespace], None], args: argparse.ArgumentParser) -> None:
    """Parse arguments, run the stage, and turn segpipe's errors into one clear line and exit 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ns = args.parse_args()
    try:
        main(ns)
    except SegpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def params_of(ns: argparse.Namespace) -> Params:
    return load_params(ns.params)
