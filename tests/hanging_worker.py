"""A Dask worker preload (`distributed.worker.preload`) for the kill test in test_ingest.py: the
worker hangs as it starts its HANG_AT-th ingest case, as one stuck on a slow disk would, so the test
kills the stage while it is certainly midway, never after it finished."""
from __future__ import annotations

import time

from distributed import Worker, WorkerPlugin

from segpipe.ingest import _ingest_case

HANG_AT = 3
KEY_PREFIX = f"{_ingest_case.__name__}-"  # client.submit names a task <function>-<uuid>


class HangAtCase(WorkerPlugin):
    def __init__(self) -> None:
        self.started = 0

    def transition(self, key: str, start: str, finish: str, **kwargs: object) -> None:
        # Called on the worker's event loop before the case is handed to a thread: sleeping here
        # stops the worker with the earlier cases fully written and this one not begun.
        if finish == "executing" and key.startswith(KEY_PREFIX):
            self.started += 1
            if self.started == HANG_AT:
                time.sleep(600)  # the test kills it long before


async def dask_setup(worker: Worker) -> None:
    await worker.plugin_add(HangAtCase(), name=HangAtCase.__name__)
