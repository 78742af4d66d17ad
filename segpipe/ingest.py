"""The `ingest` stage: one raw dataset layout -> one Zarr store (see segpipe.store for its layout).

Error policy (`IngestConfig.on_error`):
    fail  the first IngestError propagates and nothing is written at `out`: the store is built in
          a temporary sibling and renamed into place only when complete, so a previous store stays.
    skip  a bad case (or a stray file) is left out and listed in the store attrs `skipped` and in
          the report; `found == ingested + len(skipped)`, where `found` counts every case and every
          structural problem that the reader's scan turned up.

Cases are decoded by a small thread pool and written in case order as they arrive, with at most a
few decoded cases held at once, so memory stays bounded whatever the dataset size.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from segpipe.atomic import atomic_dir
from segpipe.config import IngestConfig
from segpipe.datasets import CaseData, RawCase, reader, sha256
from segpipe.errors import IngestError
from segpipe.store import IMAGE, VIDEO, CaseStore

log = logging.getLogger(__name__)

WORKERS = 2


@dataclass
class IngestReport:
    dataset: str
    found: int
    ingested: int
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what the stage writes to reports/<dataset>/ingest.json)."""
        return asdict(self)


@dataclass
class _Loaded:
    case: RawCase
    data: CaseData
    hashes: list[str]


def ingest(dataset: str, raw: Path, out: Path, cfg: IngestConfig) -> IngestReport:
    """Read every case of `raw` with the dataset's reader and write the store at `out`, atomically."""
    module = reader(dataset)
    raw = Path(raw)
    scan = module.scan(raw)
    cases, problems = _unique(scan.cases)
    problems = scan.problems + problems
    report = IngestReport(dataset, found=len(scan.cases) + len(scan.problems), ingested=0)
    for problem in problems:
        _reject(problem, cfg, report, raw)
    with atomic_dir(out) as tmp:
        store = CaseStore.create(tmp, dataset=dataset, classes=module.CLASSES, ingest=cfg.model_dump())
        for loaded in _load_all(module, cases):
            if isinstance(loaded, IngestError):
                _reject(loaded, cfg, report, raw)
                continue
            _write(store, loaded, raw, cfg)
            report.ingested += 1
        if not report.ingested:
            raise IngestError(raw, f"no case could be ingested ({len(report.skipped)} skipped)")
        store.root.attrs.update({"found": report.found, "skipped": report.skipped})
    log.info("%s: ingested %d of %d cases (%d skipped) into %s", dataset, report.ingested, report.found,
             len(report.skipped), out)
    return report


def _unique(cases: list[RawCase]) -> tuple[list[RawCase], list[IngestError]]:
    """Keep the first case of each id; later ones are problems (the store has one group per id)."""
    seen: dict[str, RawCase] = {}
    problems = []
    for case in cases:
        if case.case_id in seen:
            first = seen[case.case_id].source
            problems.append(IngestError(case.source, f"duplicate case id {case.case_id!r} (also {first})"))
        else:
            seen[case.case_id] = case
    return list(seen.values()), problems


def _reject(problem: IngestError, cfg: IngestConfig, report: IngestReport, raw: Path) -> None:
    if cfg.on_error == "fail":
        raise problem
    log.warning("skipping %s", problem)
    report.skipped.append({"source": _relative(problem.path, raw), "reason": problem.reason})


def _load_all(module: ModuleType, cases: list[RawCase]) -> Iterator[_Loaded | IngestError]:
    """Decode cases in a pool, yielding them in order; at most WORKERS + 1 are decoded ahead."""
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="ingest") as pool:
        pending: deque[Future] = deque()
        for case in cases:
            pending.append(pool.submit(_load, module, case))
            if len(pending) > WORKERS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _load(module: ModuleType, case: RawCase) -> _Loaded | IngestError:
    # Returned, not raised, so the consumer decides by policy and the pool is not left half-cancelled.
    try:
        return _Loaded(case, module.load_case(case), [sha256(path) for path in case.files()])
    except IngestError as exc:
        return exc


def _write(store: CaseStore, loaded: _Loaded, raw: Path, cfg: IngestConfig) -> None:
    case, data = loaded.case, loaded.data
    kind = data.attrs.get("kind", IMAGE)
    attrs: dict[str, Any] = {
        "group": case.group,
        "source": _relative(case.source, raw),
        "sha256": loaded.hashes[0],
        "original_size": list(data.image.shape[1:3] if kind == VIDEO else data.image.shape[:2]),
        "labelled": data.mask is not None,
        **data.attrs,
        "kind": kind,
    }
    if case.label is not None:
        attrs.update(label_source=_relative(case.label, raw), label_sha256=loaded.hashes[1])
    store.write_case(case.case_id, attrs)
    sizes = {"chunk": cfg.chunk, "frames": cfg.video_chunk_frames}
    store.write_array(case.case_id, "image", data.image, **sizes)
    if data.mask is not None:
        store.write_array(case.case_id, "mask", data.mask, **sizes)
    for name, array in data.arrays.items():
        store.write_array(case.case_id, name, array, **sizes)


def _relative(path: Path, raw: Path) -> str:
    try:
        return path.relative_to(raw).as_posix()
    except ValueError:
        return str(path)
