"""Two "machines" on one host: `make serve`, and stages on its work pool's workers through a DVC remote.

`python -m flows.server` (what `make serve` runs) starts a real `prefect server start` on
127.0.0.1, the `segpipe` process pool with its `dvc-stage/stage` deployment, and `segpipe serve` on
the coordinator's repo. Two real `prefect worker start --pool segpipe` processes run each in its
own git clone with its own DVC cache; one local-directory DVC remote joins them. The coordinator
runs no stage itself. Every process is stopped at teardown whatever happened.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.remote import record_of
from flows.server import healthy
from tests.pipeline_repo import dvc, env, make_repo, sh
from tests.prefect_server import client_of, deployments_of, free_port, start, stop, tail, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")]

WORKERS = ("worker-a", "worker-b")
DEPLOYMENTS = ["segpipe/nightly", "retrain/retrain", "predict/predict", "dvc-stage/stage"]
RUN_S = 3000  # the whole shrunk demo, a flow run per stage, on 2 shared cores


def with_remote(repo: Path, remote: Path) -> Path:
    """`repo` with `remote` as its default DVC remote, committed, as a team would set it up."""
    dvc(repo, "remote", "add", "-d", "shared", str(remote))
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "DVC remote")
    return repo


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`python -m flows.server` for a fresh coordinator repo; yields the coordinator, the
    deployments by name, the folder of logs and clones, and the server process."""
    from prefect import get_client

    root = tmp_path_factory.mktemp("machines")
    coordinator = with_remote(make_repo(root / "coordinator"), root / "remote")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = root / "serve.log"
    proc = start([sys.executable, "-m", "flows.server", "--port", str(port), "--home", str(root / "server-home"),
                  "--", "--repo", str(coordinator)], log, {**env(), "PREFECT_HOME": str(root / "serve-home")})
    try:
        wait_for(lambda: healthy(api), "make serve's server", proc, log)
        with client_of(api, root / "client-home"), get_client(sync_client=True) as client:
            deployments = wait_for(lambda: deployments_of(client, DEPLOYMENTS), "make serve's deployments", proc, log)
            yield coordinator, deployments, root, proc
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def workers(served):
    """Two workers of the pool, each in a clone of its own; yields the clones by worker name."""
    coordinator, _, root, _ = served
    from prefect.settings import PREFECT_API_URL

    clones, procs = {}, []
    try:
        for name in WORKERS:
            clones[name] = root / name
            subprocess.run(["git", "clone", "-q", str(coordinator), str(clones[name])], check=True)
            worker_env = {**env(), "PREFECT_API_URL": PREFECT_API_URL.value(), "SEGPIPE_CLONE": str(clones[name]),
                          "PREFECT_HOME": str(root / f"{name}-home"),
                          "PREFECT_WORKER_QUERY_SECONDS": "2"}  # poll often: many short stages
            procs.append(start([sys.executable, "-m", "prefect", "worker", "start", "--pool", "segpipe",
                                "--name", name, "--limit", "1"], root / f"{name}.log", worker_env, cwd=clones[name]))
        yield clones
    finally:
        for proc in procs:
            stop(proc)


def logs(root: Path) -> str:
    return "\n\n".join(tail(root / name, 40) for name in ("serve.log", *(f"{w}.log" for w in WORKERS)))


def git_status(repo: Path) -> set[str]:
    return set(sh(repo, "git", "status", "--porcelain", "--untracked-files=all").stdout.splitlines())


def outputs_of(repo: Path) -> dict[str, list]:
    """Each stage's outputs and their hashes, from dvc.lock."""
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {stage: sorted((out["path"], out.get("md5")) for out in entry.get("outs", []))
            for stage, entry in stages.items()}


def test_make_serve_registers_the_stage_pool_and_the_coordinator_deployments(served):
    from prefect import get_client

    coordinator, deployments, _, _ = served
    assert deployments["dvc-stage/stage"].work_pool_name == "segpipe"
    assert deployments["dvc-stage/stage"].pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $SEGPIPE_CLONE }}"}}]
    assert [s.schedule.cron for s in deployments["segpipe/nightly"].schedules] == ["0 2 * * *"]
    assert deployments["retrain/retrain"].parameters["repo"] == str(coordinator)
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("segpipe").type == "process"


def test_the_nightly_run_on_two_workers_ends_like_a_plain_dvc_repro(served, workers, trained_repo):
    from prefect import get_client
    from prefect.deployments import run_deployment

    coordinator, _, root, _ = served
    run = run_deployment("segpipe/nightly", parameters={"on_workers": True, "retries": 0},
                         timeout=RUN_S, poll_interval=5)

    assert run.state.is_completed(), f"{run.state.type}: {run.state.message}\n{logs(root)}"
    assert json.loads(dvc(coordinator, "status", "--json").stdout) == {}
    assert outputs_of(coordinator) == outputs_of(trained_repo)
    assert git_status(coordinator) == git_status(trained_repo)  # pulled data is git-ignored as run data is
    with get_client(sync_client=True) as client:  # where each stage ran, as its worker reported it
        reports = client.read_artifacts()
    records = {a.key: record_of(a.data) for a in reports if a.key and a.key.startswith("dvc-lock-")}
    assert len(records) == len(outputs_of(trained_repo))  # every stage ran on a worker
    assert {r["clone"] for key, r in records.items() if key.startswith("dvc-lock-train-")} == {
        str(path) for path in workers.values()}  # the train matrix was split between the two
