"""A Dask worker preload (`distributed.worker.preload`) for the kill test in test_ingest.py: the
worker hangs as it starts its HANG_AT-th ingest case, as one stuck on a slow disk would, so the test
kills the stage while it is certainly midway, never after it finished."""
from __future__ import annotations

import time
from typing import Any

from distributed import Worker

import segpipe.ingest

HANG_AT = 3


async def dask_setup(worker: Worker) -> None:
    # A task may hold several cases (segpipe.ingest.task_batches) and ingests them one by one
    # through _ingest_case, looked up in the module at each call: hanging there stops the worker
    # with the earlier cases fully written and this one not begun.
    ingest_case, started = segpipe.ingest._ingest_case, 0

    def hang_at_case(*args: Any, **kwargs: Any) -> segpipe.ingest.CaseOutcome:
        nonlocal started
        started += 1
        if started == HANG_AT:
            time.sleep(600)  # the test kills it long before
        return ingest_case(*args, **kwargs)

    segpipe.ingest._ingest_case = hang_at_case
