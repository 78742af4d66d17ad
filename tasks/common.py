"""What every stage shares: default paths, params loading, offline settings, error reporting, and
the checks of output paths that every stage makes before any work."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import dask

from segpipe.atomic import Owner, check_parent, check_replaceable
from segpipe.config import DATASET_NAMES, Params, load_params
from segpipe.errors import OutputError, SegpipeError

PARAMS = Path("params.yaml")
INTERIM = Path("data/interim")
LABELS = Path("data/labels")
SPLITS = Path("data/splits")
PREDICTIONS = Path("data/predictions")
PLANS = Path("plans")
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

# glibc malloc tuned for loops that allocate the same large arrays over and over (a decoded image per
# case, a model's activations per batch): freed blocks are kept for reuse, not handed back to the kernel
# to be faulted in and zeroed again. Dask's nanny starts its workers with MALLOC_TRIM_THRESHOLD_=64 KiB;
# these replace it for the workers this process starts. A process's own malloc reads them when it starts,
# so the stage commands get them from dvc.yaml (its `malloc` var; docs/architecture.md, "Memory").
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}
dask.config.set({f"distributed.nanny.pre-spawn-environ.{key}": value for key, value in MALLOC_ENV.items()})


def store_path(dataset: str) -> Path:
    return INTERIM / f"{dataset}.zarr"


def labels_path(dataset: str) -> Path:
    """Where a dataset's training masks live, given or pseudo-labelled (see segpipe.labels)."""
    return LABELS / f"{dataset}.zarr"


def plan_path(dataset: str) -> Path:
    return PLANS / f"{dataset}.json"


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
    "plan": "plan JSON (default: plans/<dataset>.json)",
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


# Output checks: a stage calls them on every output path before any work, so that a mistyped path
# fails first, in one line, rather than after hours of work or after another output was replaced.


def output_file(path: Path) -> Path:
    """`path`, once sure that a stage can write a file there: not a folder, and its folder can be made."""
    if path.is_dir():
        raise OutputError(path, "is a folder; expected the path of a file to write")
    check_parent(path)
    return path


def output_dir(path: Path, owner: Owner) -> Path:
    """`path`, once sure that `owner`'s output folder may replace what is there (segpipe.atomic)."""
    check_replaceable(path, owner)
    return path


def output_folder(path: Path) -> Path:
    """`path`, once sure that a stage can write into a folder there in place (DVCLive's metrics)."""
    if path.exists() and not path.is_dir():
        raise OutputError(path, "is a file; expected a folder to write into")
    check_parent(path)
    return path


def apart_from_input(out: Path, source: Path) -> None:
    """Refuse an output that is, lies inside or contains the input `source`: an output is replaced
    whole, so writing it would delete the input, or part of it."""
    o, s = out.resolve(), source.resolve()
    where = ("is the input folder" if o == s else "lies inside the input folder" if s in o.parents
             else "contains the input folder" if o in s.parents else None)
    if where:
        raise OutputError(out, f"{where} {source}; choose an output path apart from it")
