"""dask_client: every worker keeps freed memory for reuse, including workers that join later."""
from __future__ import annotations

from segpipe.config import DaskConfig
from segpipe.malloc import keep_freed_memory
from segpipe.parallel import dask_client


def tuned_here() -> bool:
    """Whether this process has applied the malloc tuning (keep_freed_memory runs once per process)."""
    return keep_freed_memory.cache_info().currsize == 1


def test_every_worker_process_keeps_freed_memory():
    with dask_client(DaskConfig(n_workers=2, threads_per_worker=1)) as client:
        assert list(client.run(tuned_here).values()) == [True, True]
        client.cluster.scale(3)  # a worker started after the client connected
        client.wait_for_workers(3)
        assert list(client.run(tuned_here).values()) == [True, True, True]
