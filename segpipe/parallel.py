"""Dask for the stages that fan out over files, cases or tiles: a LocalCluster by default, or the
scheduler named in params for a real cluster."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

from segpipe.config import DaskConfig


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
