"""Parallel work: Dask for the stages that fan out over files, cases or tiles (a LocalCluster by
default, or the scheduler named in params for a real cluster), and, within one process, threads
that overlap I/O and data preparation with the model's compute."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from queue import Empty, Queue
from typing import TypeVar

from distributed import Client, LocalCluster

from segpipe.config import DaskConfig

T = TypeVar("T")


@contextmanager
def dask_client(cfg: DaskConfig) -> Iterator[Client]:
    """A client for the configured scheduler; a LocalCluster started here is closed on exit."""
    if cfg.scheduler:
        with Client(cfg.scheduler) as client:
            yield client
        return
    # Any free port for its HTTP server: a fixed one (8787) clashes with a second cluster on the machine.
    with LocalCluster(
        n_workers=cfg.n_workers, threads_per_worker=cfg.threads_per_worker, processes=True,
        dashboard_address=":0",
    ) as cluster, Client(cluster) as client:
        yield client


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def background(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate `items` in a thread, at most `depth` items ahead of the consumer, so that reading and
    preparing the next batch or tile overlaps the model's work on this one (the model's own threads
    rarely use every core at small batch sizes). Items arrive in order; the producer's exceptions
    are raised here. Only the producer thread advances `items`, so seeded draws stay in order."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                queue.put(item)
            queue.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            queue.put(_Failure(exc))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not _DONE:
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting to put, then let it finish
            try:
                queue.get_nowait()
            except Empty:
                thread.join(timeout=0.01)


class WriteBehind:
    """Writes run in one thread, at most one pending: the next band's compute overlaps this band's
    write. Leaving the `with` waits for the last write and raises its error, if any."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="write")
        self._pending: Future | None = None

    def submit(self, write: Callable[..., None], *args: object) -> None:
        self.wait()
        self._pending = self._pool.submit(write, *args)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if exc_info[0] is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)
