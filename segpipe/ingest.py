"""The `ingest` stage: one raw dataset layout -> one Zarr store (see segpipe.store for its layout).

Incremental: every case records the sha256 of its files, and of what the reader's scan found
about it elsewhere (RawCase.meta: a Kvasir case's entry in the shared bounding-box JSON). A
rerun hashes the cases the store already holds, re-decodes only new and changed ones and drops
cases whose files are gone; when nothing changed the store is not touched at all. Everything is
ingested afresh when the layout params (chunk sizes) or the code that decodes and writes a case
differ from what built the store.

Atomic: the new store is built in a temporary sibling (unchanged cases hard-linked from the
previous store, so their bytes are neither copied nor rewritten) and renamed into place only
when complete, so a killed or failed ingest leaves the previous store exactly as it was.

Parallel and bounded: cases are hashed and decoded on a Dask cluster, in tasks of one or more
cases (see task_batches), at most `max_in_flight` tasks at once; a task decodes its cases one
after the other and writes each straight into the temporary store, returning only their hashes,
so memory holds a decoded case per worker thread, never the dataset. The store must be on a
filesystem the workers share.

Error policy (`IngestConfig.on_error`):
    fail  the first IngestError propagates and the previous store (if any) stays as it was.
    skip  a bad case (or a stray file) is left out and listed in the store attrs `skipped` and in
          the report; `found == ingested + unchanged + len(skipped)`, where `found` counts every
          case and every structural problem that the reader's scan turned up. A case that failed
          is retried only once its files change.
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from distributed import Client, as_completed, wait

import segpipe.datasets
import segpipe.encoded_image
import segpipe.store
from segpipe.atomic import Owner, atomic_dir
from segpipe.config import IngestConfig
from segpipe.datasets import CaseData, RawCase, Scan, reader, sha256
from segpipe.errors import IngestError, SegpipeError
from segpipe.progress import Progress
from segpipe.store import IMAGE, VIDEO, CaseStore

log = logging.getLogger(__name__)

LAYOUT_PARAMS = ("chunk", "video_chunk_frames")  # the ingest params that shape the stored arrays
_END = object()
# Cases hashed per task on a rerun: hashing a file is far quicker than a task's round trip.
HASH_BATCH = 32
# A task to ingest takes cases until their files reach this size (see task_batches): one 2048 px
# hand X-ray (~3 MB) or one video fills a task, a real Kvasir pair (~50 kB) takes ~20 companions.
TASK_BYTES = 1 << 20
IN_FLIGHT_PER_THREAD = 4  # see in_flight_limit


@dataclass
class IngestReport:
    dataset: str
    found: int
    ingested: int  # cases written by this run: new ones plus `changed`
    unchanged: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # case ids re-ingested because their files changed
    removed: list[str] = field(default_factory=list)  # case ids dropped because their files are gone
    rebuilt: str | None = None  # why every case was ingested afresh over a previous store, if so

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what the stage writes to reports/<dataset>/ingest.json)."""
        return asdict(self)

    def summary(self) -> str:
        line = (f"{self.found} found: {self.ingested} ingested ({len(self.changed)} changed), "
                f"{self.unchanged} unchanged, {len(self.skipped)} skipped, {len(self.removed)} removed")
        return line + (f"; rebuilt: {self.rebuilt}" if self.rebuilt else "")


@dataclass(frozen=True)
class CaseOutcome:
    """What a worker returns for one case: small and picklable (no arrays; IngestError itself
    does not survive pickling, so its file and reason travel instead)."""

    case_id: str
    hashes: list[str]
    error: tuple[str, str] | None = None


@dataclass
class _Previous:
    """The existing store at `out`, as far as deciding what to redo goes."""

    store: CaseStore
    hashes: dict[str, list[str]]  # case id -> sha256 of its files
    failed: dict[str, dict[str, Any]]  # case id -> its skip entry (cases whose decoding failed)


def ingest(dataset: str, raw: Path, out: Path, cfg: IngestConfig, client: Client, scan: Scan | None = None
           ) -> IngestReport:
    """Bring the store at `out` up to date with every case of `raw`'s layout, or of `scan` where given
    (files found otherwise, named relative to `raw`: segpipe.predict's inputs); `client`'s workers
    hash, decode and write the cases (they must see `raw` and `out` at the same paths)."""
    module, raw, out = reader(dataset), Path(raw).absolute(), Path(out).absolute()
    scan = _absolute(scan or module.scan(raw))
    cases, duplicates = _unique(scan.cases)
    report = IngestReport(dataset, found=len(scan.cases) + len(scan.problems), ingested=0)
    for problem in scan.problems + duplicates:
        _reject(problem, cfg, report, raw)
    limit = in_flight_limit(cfg, client)
    code = _code_fingerprint(module)
    previous, report.rebuilt = _previous(out, dataset, cfg, code)

    unchanged, failed, todo = _compare(client, cases, previous, limit)
    for case in failed:  # failed before and unchanged since: no point decoding them again
        entry = previous.failed[case.case_id]
        _reject(IngestError(raw / entry["source"], entry["reason"]), cfg, report, raw, entry)
    present = {case.case_id for case in cases}
    report.removed = sorted(set(previous.hashes) - present) if previous else []
    report.changed = [case.case_id for case in todo if previous and case.case_id in previous.hashes]
    report.unchanged = len(unchanged)
    owner = Owner("ingest", dataset)  # its mark is one of the attrs an up-to-date store has
    attrs = {"dataset": dataset, "classes": module.CLASSES, "ingest": cfg.model_dump(), "code": code,
             **owner.store_attrs()}
    if previous and not todo and not report.removed and previous.store.attrs == _root_attrs(attrs, report):
        log.info("%s: store %s is up to date (%d cases)", dataset, out, report.unchanged)
        return report

    with atomic_dir(out, owner) as tmp:
        store = CaseStore.create(tmp, **attrs)
        for case in unchanged:
            store.link_case(previous.store, case.case_id)
        _ingest_all(client, todo, store, raw, cfg, report, limit)
        if not report.ingested + report.unchanged:
            raise IngestError(raw, f"no case could be ingested ({len(report.skipped)} skipped)")
        store.set_attrs(_root_attrs(attrs, report))
    log.info("%s: %s -> %s", dataset, report.summary(), out)
    return report


def _absolute(scan: Scan) -> Scan:
    """`scan` with absolute paths. A worker of a real cluster runs in a folder of its own, where a
    path relative to the client's folder (the stages' defaults are) names another file, or none."""
    cases = [replace(case, source=case.source.absolute(),
                     label=None if case.label is None else case.label.absolute(),
                     extras={name: path.absolute() for name, path in case.extras.items()}) for case in scan.cases]
    return Scan(cases, [IngestError(problem.path.absolute(), problem.reason) for problem in scan.problems])


def _ingest_all(client: Client, cases: list[RawCase], store: CaseStore, raw: Path, cfg: IngestConfig,
                report: IngestReport, limit: int) -> None:
    """Have the workers decode `cases` and write them into `store`; count them or reject them."""
    outcomes: dict[str, CaseOutcome] = {}
    with closing(map_bounded(client, _ingest_cases, task_batches(cases, limit), limit, dataset=report.dataset,
                             store=store.path, raw=raw, cfg=cfg)) as arriving, \
            Progress(f"ingest {report.dataset}", len(cases)) as progress:
        for outcome in itertools.chain.from_iterable(arriving):
            if outcome.error and cfg.on_error == "fail":
                raise IngestError(*outcome.error)
            outcomes[outcome.case_id] = outcome
            report.ingested += not outcome.error
            progress.update()
    for case in cases:  # case order, so the report does not depend on which worker finished first
        outcome = outcomes[case.case_id]
        if outcome.error:
            failed_case = {"case_id": case.case_id, "sha256": outcome.hashes}
            _reject(IngestError(*outcome.error), cfg, report, raw, failed_case)


def in_flight_limit(cfg: IngestConfig, client: Client) -> int:
    """Tasks submitted at once: by default IN_FLIGHT_PER_THREAD per worker thread. A queued task
    holds no pixels (a thread decodes one case at a time, and a finished task returns only
    hashes), so memory holds a case per thread whatever the dataset size, while the queue keeps
    threads busy across the round trips to the client: with 4 instead of 2, Kvasir ingest (a case
    per task then) went from 42-49 to 63 images/s on 2 workers."""
    return cfg.max_in_flight or IN_FLIGHT_PER_THREAD * sum(client.nthreads().values())


def task_batches(cases: list[RawCase], limit: int) -> list[list[RawCase]]:
    """`cases` in order, cut into the tasks that ingest them: each takes cases until their files
    reach TASK_BYTES, and at most len(cases) // limit of them, so that a small dataset still gives
    every one of the `limit` tasks in flight some work.

    Why: on the 2-core development VM a Dask task's round trip costs ~10 ms of CPU across client,
    scheduler and worker, more than a real Kvasir pair takes to decode (~4 ms). With a case per
    task 300 pairs took 3.3-4.2 s to ingest on 2 workers, in tasks of 8 pairs 1.9 s."""
    most = max(1, len(cases) // limit)
    batches: list[list[RawCase]] = []
    size = 0
    for case in cases:
        if not batches or size >= TASK_BYTES or len(batches[-1]) >= most:
            batches.append([])
            size = 0
        batches[-1].append(case)
        size += _file_bytes(case)
    return batches


def _file_bytes(case: RawCase) -> int:
    """The size of a case's files; one that cannot be read counts 0 (hashing it reports why)."""
    size = 0
    for path in case.files():
        try:
            size += path.stat().st_size
        except OSError:
            pass
    return size


def map_bounded(client: Client, fn: Callable[..., Any], items: Iterable[Any], limit: int,
                **kwargs: Any) -> Iterator[Any]:
    """`fn(item, **kwargs)` for each item on the cluster, yielded as they complete, with never more
    than `limit` submitted and unfinished: the cluster holds a few items' work, not the dataset's.

    Close the generator (e.g. with contextlib.closing) when leaving early: it then waits for the
    work already submitted, so nothing is still writing when the caller cleans up.
    """
    items = iter(items)
    pending = as_completed(loop=client.loop)

    def submit_next() -> None:
        item = next(items, _END)
        if item is not _END:
            # pure=False: results depend on files that may change between calls with equal arguments
            pending.add(client.submit(fn, item, pure=False, **kwargs))

    try:
        for _ in range(limit):
            submit_next()
        for future in pending:
            result = future.result()
            future.release()
            submit_next()
            yield result
    finally:
        wait(list(pending.futures))  # the unfinished ones


def _compare(client: Client, cases: list[RawCase], previous: _Previous | None,
             limit: int) -> tuple[list[RawCase], list[RawCase], list[RawCase]]:
    """Split cases into (unchanged, failed before and unchanged, to ingest), hashing on the cluster
    only the cases the previous store knows: new ones are ingested whatever their hashes."""
    if previous is None:
        return [], [], cases
    known = [case for case in cases if case.case_id in previous.hashes or case.case_id in previous.failed]
    batches = [known[i:i + HASH_BATCH] for i in range(0, len(known), HASH_BATCH)]
    current = {o.case_id: o.hashes for batch in map_bounded(client, _hash_cases, batches, limit)
               for o in batch if not o.error}
    unchanged, failed, todo = [], [], []
    for case in cases:
        hashes = current.get(case.case_id)
        if hashes is not None and hashes == previous.hashes.get(case.case_id):
            unchanged.append(case)
        elif hashes is not None and hashes == previous.failed.get(case.case_id, {}).get("sha256"):
            failed.append(case)
        else:  # new, changed, or unreadable (decoding it again reports why)
            todo.append(case)
    return unchanged, failed, todo


def _previous(out: Path, dataset: str, cfg: IngestConfig, code: str) -> tuple[_Previous | None, str | None]:
    """The store to update incrementally, or None and why everything must be ingested afresh."""
    if not out.exists():
        return None, None
    try:
        store = CaseStore(out)
        attrs = store.attrs
        hashes = {case_id: _recorded_hashes(store.case_attrs(case_id)) for case_id in store.case_ids()}
    except (SegpipeError, OSError, ValueError, KeyError) as exc:
        return None, f"previous store unreadable ({exc})"
    if attrs.get("dataset") != dataset:
        return None, f"previous store holds dataset {attrs.get('dataset')!r}"
    old = {key: attrs.get("ingest", {}).get(key) for key in LAYOUT_PARAMS}
    new = {key: getattr(cfg, key) for key in LAYOUT_PARAMS}
    if old != new:
        return None, f"ingest params changed: {old} -> {new}"
    if attrs.get("code") != code:
        return None, "the code that decodes and writes cases changed"
    failed = {entry["case_id"]: entry for entry in attrs.get("skipped", []) if "case_id" in entry}
    return _Previous(store, hashes, failed), None


def _recorded_hashes(attrs: dict[str, Any]) -> list[str]:
    """A stored case's hashes, in the order of _hashes."""
    extras = attrs.get("extra_sha256", {})
    labels = [attrs["label_sha256"]] if "label_sha256" in attrs else []
    meta = [attrs["meta_sha256"]] if "meta_sha256" in attrs else []
    return [attrs["sha256"], *labels, *(extras[name] for name in sorted(extras)), *meta]


def _root_attrs(attrs: dict[str, Any], report: IngestReport) -> dict[str, Any]:
    return {**attrs, "found": report.found, "skipped": report.skipped}


def code_sources(module: ModuleType) -> list[Path]:
    """The sources that decide a case's stored bytes and attrs, for the reader `module`: the ingest
    stage in dvc.yaml depends on each, so that changing one reruns it."""
    modules = (module, segpipe.datasets, segpipe.store, segpipe.encoded_image)
    return [Path(inspect.getsourcefile(m)) for m in modules] + [Path(__file__)]


def _code_fingerprint(module: ModuleType) -> str:
    """sha256 of code_sources: a change to any of them (a reader fix, a new attr) must reach every
    case, not only the new ones."""
    return ":".join(sha256(source)[:16] for source in code_sources(module))


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


def _reject(problem: IngestError, cfg: IngestConfig, report: IngestReport, raw: Path,
            failed_case: dict[str, Any] | None = None) -> None:
    """Raise or list `problem`; a case that failed to decode is listed with its id and hashes
    (`failed_case`), so that it is retried only once its files change."""
    if cfg.on_error == "fail":
        raise problem
    log.warning("skipping %s", problem)
    entry = {"source": _relative(problem.path, raw), "reason": problem.reason}
    report.skipped.append({**entry, "case_id": failed_case["case_id"], "sha256": failed_case["sha256"]}
                          if failed_case else entry)


# --- what runs on the workers ------------------------------------------------------------------


def _hash_cases(cases: list[RawCase]) -> list[CaseOutcome]:
    outcomes = []
    for case in cases:
        try:
            outcomes.append(CaseOutcome(case.case_id, _hashes(case)))
        except IngestError as exc:
            outcomes.append(CaseOutcome(case.case_id, [], (str(exc.path), exc.reason)))
    return outcomes


def _ingest_cases(cases: list[RawCase], dataset: str, store: Path, raw: Path, cfg: IngestConfig) -> list[CaseOutcome]:
    """One task: the cases one after the other, each written before the next is decoded."""
    return [_ingest_case(case, dataset, store, raw, cfg) for case in cases]


def _ingest_case(case: RawCase, dataset: str, store: Path, raw: Path, cfg: IngestConfig) -> CaseOutcome:
    """Decode one case and write it into the store; IngestErrors are returned, not raised, so the
    client applies the error policy and the remaining work is not left half-cancelled."""
    hashes: list[str] = []
    try:
        hashes = _hashes(case)
        data = reader(dataset).load_case(case)
    except IngestError as exc:
        return CaseOutcome(case.case_id, hashes, (str(exc.path), exc.reason))
    _write(CaseStore(store, mode="r+"), case, data, hashes, raw, cfg)
    return CaseOutcome(case.case_id, hashes)


def _hashes(case: RawCase) -> list[str]:
    """sha256 of each of the case's files (in the order of RawCase.files()), then of its meta if any."""
    hashes = []
    for path in case.files():
        try:
            hashes.append(sha256(path))
        except OSError as exc:
            raise IngestError(path, f"unreadable: {exc.strerror or exc}") from exc
    if case.meta:
        hashes.append(_meta_sha256(case.meta))
    return hashes


def _meta_sha256(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _write(store: CaseStore, case: RawCase, data: CaseData, hashes: list[str], raw: Path,
           cfg: IngestConfig) -> None:
    kind = data.attrs.get("kind", IMAGE)
    sha_of = dict(zip(case.files(), hashes))
    attrs: dict[str, Any] = {
        "group": case.group,
        "source": _relative(case.source, raw),
        "sha256": sha_of[case.source],
        "original_size": list(data.image.shape[1:3] if kind == VIDEO else data.image.shape[:2]),
        "labelled": data.mask is not None,
        **data.attrs,
        "kind": kind,
    }
    if case.label is not None:
        attrs.update(label_source=_relative(case.label, raw), label_sha256=sha_of[case.label])
    if case.extras:
        attrs.update(extra_sources={name: _relative(path, raw) for name, path in case.extras.items()},
                     extra_sha256={name: sha_of[path] for name, path in case.extras.items()})
    if case.meta:
        attrs.update(meta_sha256=hashes[-1])
    masks = {} if data.mask is None else {"mask": data.mask}
    store.write_case(case.case_id, attrs, {"image": data.image, **masks, **data.arrays}, cfg.chunk,
                     cfg.video_chunk_frames)


def _relative(path: Path, raw: Path) -> str:
    try:
        return path.relative_to(raw).as_posix()
    except ValueError:
        return str(path)
