"""New data through the trained ensemble: what `tasks.predict` (`segpipe predict`) runs.

It takes the pipeline's own path, so that its answer is the pipeline's, bit for bit:
    1. the input is read into a working store: a segpipe Zarr store as it is; else ingested by the
       dataset's reader with the usual checks (segpipe.ingest; a bad file fails, or with on_error
       "skip" is left out and listed): a folder in the dataset's raw layout (labels optional), a
       folder of image or video files alone, or one file;
    2. every member the ensemble stage recorded (reports/<dataset>/ensemble.json, in its order)
       predicts every case (segpipe.infer.predict_store: its checkpoint, the plan's test-time
       flips, tiles where the model was trained on tiles), on the Dask cluster;
    3. segpipe.ensemble.apply_ensemble takes their weighted mean and cuts it with the recorded
       per-class thresholds;
    4. the files a person opens are written from that store (segpipe.prediction_files).
The output folder is written whole and swapped in at the end (segpipe.atomic): a failed run leaves
the previous one, and only predict's own earlier output is ever replaced.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segpipe.atomic import Owner, atomic_dir, write_json
from segpipe.config import EnsembleConfig, IngestConfig, InferConfig, PredictConfig
from segpipe.ensemble import apply_ensemble
from segpipe.datasets import Scan, reader, visible
from segpipe.errors import IngestError, StoreError
from segpipe.infer import predict_store
from segpipe.ingest import ingest
from segpipe.prediction_files import write_files
from segpipe.store import CaseStore

if TYPE_CHECKING:
    from distributed import Client

PREDICTIONS = "predictions.zarr"
SUMMARY = "predict.json"
WORK = ".work"  # the working stores, inside the output folder until it is swapped in


@dataclass(frozen=True)
class Trained:
    """The trained ensemble of a dataset: its members' checkpoints, in the recorded order, and what
    the ensemble stage recorded (weighting, weights, per-class thresholds)."""

    dataset: str
    checkpoints: list[Path]
    recorded: dict[str, Any]


@dataclass
class PredictSummary:
    dataset: str
    source: str
    cases: list[str]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    low_confidence: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{len(self.cases)} cases predicted, {len(self.skipped)} skipped, "
                f"{len(self.low_confidence)} with a low-confidence class")


def input_scan(dataset: str, source: Path) -> tuple[Scan, Path]:
    """The cases of an input that is not a store, and the folder their sources are named from: one
    file; a folder of files alone (no subfolder), each file a case; else the dataset's raw layout."""
    module = reader(dataset)
    if source.is_file():
        return Scan([module.single_case(source)], []), source.parent
    entries = visible(source)
    if entries and all(entry.is_file() for entry in entries):
        cases, problems = [], []
        for entry in entries:
            try:
                cases.append(module.single_case(entry))
            except IngestError as exc:
                problems.append(exc)
        return Scan(cases, problems), source
    return module.scan(source), source


def input_store(dataset: str, source: Path, work: Path, cfg: IngestConfig, client: Client
                ) -> tuple[CaseStore, list[dict[str, Any]]]:
    """The cases to predict, and the input files left out (on_error "skip"): a segpipe store as it is,
    anything else ingested into `work`."""
    if (source / "zarr.json").is_file():
        store = CaseStore(source)
        if store.attrs.get("dataset") != dataset:
            raise StoreError(f"{source}: a store of dataset {store.attrs.get('dataset')!r}, not {dataset!r}")
        missing = [c for c in store.case_ids() if not store.has(c, "image")]
        if missing or not store.case_ids():
            raise StoreError(f"{source}: no images to predict" + (f" in case {missing[0]!r}" if missing else ""))
        return store, []
    scan, root = input_scan(dataset, source)
    report = ingest(dataset, root, work / "images.zarr", cfg, client, scan)
    return CaseStore(work / "images.zarr"), report.skipped


def predict(trained: Trained, source: Path, out: Path, ingest_cfg: IngestConfig, infer_cfg: InferConfig,
            ensemble_cfg: EnsembleConfig, predict_cfg: PredictConfig, device: str, client: Client
            ) -> PredictSummary:
    """Predict every case of `source` into the folder `out` (see the module doc)."""
    # Absolute: the Dask workers that write the files may run in another folder (a real cluster).
    source, out = Path(source).absolute(), Path(out).absolute()
    with atomic_dir(out, Owner("predict", trained.dataset)) as tmp:
        work = tmp / WORK
        images, skipped = input_store(trained.dataset, source, work, ingest_cfg, client)
        roles = {case_id: "test" for case_id in images.case_ids()}
        members = [work / f"member{i}.zarr" for i in range(len(trained.checkpoints))]
        for checkpoint, member in zip(trained.checkpoints, members):
            predict_store(checkpoint, images, roles, member, infer_cfg, device, client)
        apply_ensemble(members, tmp / PREDICTIONS, trained.recorded, ensemble_cfg.batch_frames)
        rows = write_files(CaseStore(tmp / PREDICTIONS), images, tmp, predict_cfg, client)
        summary = PredictSummary(trained.dataset, str(source), sorted(roles), skipped,
                                 sorted({row["case_id"] for row in rows if row["low_confidence"]}))
        write_json(tmp / SUMMARY, {**summary.__dict__, "members": trained.recorded["members"],
                                   "thresholds": trained.recorded["thresholds"]})
        shutil.rmtree(work)
    return summary
