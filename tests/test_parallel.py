"""dask_client's workers start with the stage layer's malloc settings (tasks.common.MALLOC_ENV),
including workers that join later, and so do the stage commands that run models."""
from __future__ import annotations

import os

import yaml

from segpipe.config import DaskConfig
from segpipe.parallel import dask_client
from tasks.common import MALLOC_ENV
from tests.conftest import ROOT


def malloc_env() -> dict[str, str | None]:
    return {key: os.environ.get(key) for key in MALLOC_ENV}


def test_every_worker_process_starts_with_the_malloc_settings():
    with dask_client(DaskConfig(n_workers=2, threads_per_worker=1)) as client:
        assert list(client.run(malloc_env).values()) == [MALLOC_ENV, MALLOC_ENV]
        client.cluster.scale(3)  # a worker started after the client connected
        client.wait_for_workers(3)
        assert list(client.run(malloc_env).values()) == [MALLOC_ENV] * 3


def test_the_stages_that_run_models_start_with_the_same_settings():
    """dvc.yaml's `malloc` prefix sets, for the processes it starts, what MALLOC_ENV gives the workers."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    [malloc] = [entry["malloc"] for entry in dvc["vars"] if "malloc" in entry]
    assert dict(pair.split("=") for pair in malloc.split()) == MALLOC_ENV
    prefixed = {name for name, stage in dvc["stages"].items()
                if stage.get("do", stage)["cmd"].startswith("${malloc} python -m")}
    assert prefixed == {"labels", "train", "infer", "ensemble"}
