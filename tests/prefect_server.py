"""A real Prefect server for tests: `prefect server start` on a free port of 127.0.0.1, and the
subprocess helpers its tests share. Every process runs in its own process group with its own
PREFECT_HOME and is stopped at teardown whatever happened; every wait has a deadline."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from flows.server import healthy
from tests.pipeline_repo import env

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STARTUP_S = 240  # the server migrates its database first; the machine may be busy
RUN_S = 900  # a predict run, flow-run process start-up included


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], log: Path, environ: dict[str, str], cwd: Path = PROJECT_ROOT) -> subprocess.Popen:
    with log.open("w") as out:  # the child keeps its own copy of the file
        return subprocess.Popen(command, cwd=cwd, env=environ, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """End `proc`, its process group and every descendant (a served flow run may start a session
    of its own): SIGTERM, then SIGKILL for what is left after 30 s."""
    family: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        family = psutil.Process(proc.pid).children(recursive=True)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(signum)
        _, alive = psutil.wait_procs(family, timeout=30)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
            if not alive:
                return


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_for(ready: Callable[[], object], what: str, proc: subprocess.Popen, log: Path):
    """`ready()`'s first truthy value; fails with the log's tail if `proc` exits or STARTUP_S pass."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}:\n{tail(log)}")
        if value := ready():
            return value
        time.sleep(1)
    pytest.fail(f"{what}: not ready within {STARTUP_S} s:\n{tail(log)}")


def deployments_of(client, names: list[str]) -> dict | None:
    """The deployments called `names` ("flow/deployment"), or None until all are registered."""
    from prefect.exceptions import ObjectNotFound

    try:
        return {name: client.read_deployment_by_name(name) for name in names}
    except ObjectNotFound:
        return None


@contextlib.contextmanager
def client_of(api: str, home: Path) -> Iterator[str]:
    """This process's Prefect client pointed at `api`, with its own home, for the block."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))  # before prefect's first import
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

        with temporary_settings({PREFECT_API_URL: api, PREFECT_HOME: home}):
            yield api


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real `prefect server start` on a free local port; this process's client points at it."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_env = {**env(), "PREFECT_HOME": str(root / "home"), "PREFECT_UI_ENABLED": "false"}
    server_env.pop("PREFECT_API_URL", None)
    log = root / "server.log"
    server = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                    "--port", str(port)], log, server_env)
    try:
        wait_for(lambda: healthy(api), "prefect server", server, log)
        with client_of(api, root / "client-home"):
            yield api
    finally:
        stop(server)
