"""Dask for the stages that fan out over files, cases or tiles: a LocalCluster by default, or the
scheduler named in params for a real cluster."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from distributed import Client, LocalCluster, as_completed

from segpipe.config import DaskConfig
from segpipe.progress import Progress


@contextmanager
def dask_client(cfg: DaskConfig) -> Iterator[Client]:
    """A client for the configured scheduler; a LocalCluster started here is closed on exit. Its
    workers start with the environment of Dask's config `distributed.nanny.pre-spawn-environ`."""
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


def map_tracked(client: Client, fn: Callable[..., Any], items: list[Any], desc: str, unit: str = "case",
                **kwargs: Any) -> list[Any]:
    """`[fn(item, **kwargs) for item in items]` on the cluster, in the order of `items`, counting each
    as it finishes (segpipe.progress). The first failure is raised once the rest have finished."""
    futures = client.map(fn, items, pure=False, **kwargs)
    with Progress(desc, len(futures), unit) as progress:
        for _ in as_completed(futures):
            progress.update()
    return client.gather(futures)
