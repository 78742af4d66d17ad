"""segpipe on a real Dask cluster, started as a user starts one: a `dask scheduler` and two `dask worker`
processes, named in params.yaml `dask.scheduler`. Ingest and tiled inference run there, and write
the bytes that the same stages write on the default LocalCluster."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from dask.utils import key_split
from distributed import Client, get_task_stream

from segpipe.config import HandXrayDemo
from segpipe.datasets import demo_hand, reader
from segpipe.store import CaseStore
from segpipe.train import new_model, save_checkpoint
from tasks import infer, ingest, labels, plan, split
from tests.conftest import ROOT
from tests.pipeline_repo import SMALL_PARAMS, shrink

DASK = Path(sys.executable).parent / "dask"  # the venv's entry point, as a user runs it
STORE = Path("data/interim/hand_xray.zarr")
PREDICTIONS = Path("data/predictions/hand_xray/folds/unet/fold0.zarr")
MODEL = Path("models/hand_xray/unet/fold0/best.pt")


@dataclass
class Cluster:
    address: str
    worker_pids: set[int]  # the `dask worker` processes (nannies): each worker process is a child of one


def start(args: list[str], folder: Path, name: str) -> subprocess.Popen:
    """A process in a session of its own (so that it and its children can be stopped together), run
    in `folder`, apart from the project: a path the client passes relative would miss there."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this tree's segpipe, as the client runs it
    with (folder / f"{name}.log").open("w") as log:  # the child keeps its own descriptor
        return subprocess.Popen([str(DASK), *args], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"no {path.name}:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """A scheduler on a free port of 127.0.0.1 and two one-thread workers, all stopped afterwards."""
    folder = tmp_path_factory.mktemp("cluster")
    address_file = folder / "scheduler.json"
    procs = [start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                    "--scheduler-file", str(address_file)], folder, "scheduler")]
    try:
        wait_for(address_file, procs[0], folder / "scheduler.log")
        procs += [start(["worker", "--scheduler-file", str(address_file), "--host", "127.0.0.1", "--nthreads", "1",
                         "--no-dashboard", "--name", f"w{i}"], folder, f"worker{i}") for i in range(2)]
        with Client(scheduler_file=str(address_file)) as client:
            client.wait_for_workers(2, timeout=120)
            address = client.scheduler_info()["address"]
        yield Cluster(address, {proc.pid for proc in procs[1:]})
    finally:
        for proc in reversed(procs):
            stop(proc)


def project(folder: Path, scheduler: str | None, raw: Path, model: Path) -> Path:
    """A user's project: the shrunk demo params naming `scheduler` (None: a LocalCluster), hand X-rays
    tiled at half scale, the demo's raw files at their default relative path, and a checkpoint."""
    params = shrink(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["device"] = "cpu"
    params["dask"] = {"scheduler": scheduler, "n_workers": 2, "threads_per_worker": 1}
    params["datasets"]["hand_xray"].update(image_size=[32, 32], tile_scale=0.5)
    params["ingest"]["chunk"] = 128  # 256 px images: 2 x 2 chunks
    params["infer"]["band_rows"] = 128  # two inference tasks an image
    folder.mkdir()
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(raw, folder / params["datasets"]["hand_xray"]["raw"])
    (folder / MODEL).parent.mkdir(parents=True)
    shutil.copy(model, folder / MODEL)
    return folder


def untrained_checkpoint(path: Path, classes: list[str]) -> Path:
    """A tiled model's checkpoint: a 32 px input at scale 0.5 covers 64 px of a 256 px image."""
    meta = {"arch": "unet", "classes": classes, "in_channels": 1, "image_size": [32, 32], "channels": [8, 16],
            "tile_scale": 0.5, "val_dice": 0.5}
    save_checkpoint(path, new_model(meta, 0), meta)
    return path


def run(stage: ModuleType, *args: str) -> None:
    """A stage as its command line runs it, in the current folder, with the project's params.yaml."""
    stage.main(stage.build_parser().parse_args(["--dataset", "hand_xray", *args]))


def ingest_and_infer() -> None:
    """The stages from raw files to one fold's tiled predictions, on the cluster params.yaml names."""
    run(ingest)
    for stage in (labels, split, plan):
        run(stage)
    run(infer, "--arch", "unet", "--fold", "0")


def tasks_run(stream: list[dict]) -> tuple[Counter, set[str]]:
    """How many tasks of each name (a key without its unique part) ran, and on which workers."""
    return Counter(key_split(task["key"]) for task in stream), {task["worker"] for task in stream}


def files_of(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_ingest_and_tiled_inference_run_on_the_scheduler_in_params_and_write_a_local_clusters_bytes(
        cluster, tmp_path, monkeypatch):
    demo_hand.write(tmp_path / "demo", HandXrayDemo(**SMALL_PARAMS["demo"]["hand_xray"]), seed=0)
    checkpoint = untrained_checkpoint(tmp_path / "best.pt", reader("hand_xray").CLASSES)
    raw = tmp_path / "demo" / "hand_xray"
    on_cluster = project(tmp_path / "on_cluster", cluster.address, raw, checkpoint)
    local = project(tmp_path / "local", None, raw, checkpoint)

    monkeypatch.chdir(on_cluster)
    with Client(cluster.address) as client, get_task_stream(client) as stream:
        ingest_and_infer()
        parents = client.run(os.getppid)
    monkeypatch.chdir(local)
    ingest_and_infer()

    # Every task ran on the two `dask worker` processes started above: a case an ingest task (the
    # cases are few), two bands of rows a predicted image.
    assert set(parents.values()) == cluster.worker_pids
    counts, workers = tasks_run(stream.data)
    cases, predicted = CaseStore(on_cluster / STORE).case_ids(), CaseStore(on_cluster / PREDICTIONS).case_ids()
    assert counts == {"ingest_cases": len(cases), "run_job": 2 * len(predicted)} and workers == set(parents)
    for output in (STORE, PREDICTIONS):
        assert files_of(on_cluster / output) == files_of(local / output), output
