"""`make serve`: segpipe's orchestration on this machine, stopped together with Ctrl-C.

1. `prefect server start` on 127.0.0.1 (its database in .prefect-server/, its log there too);
2. the `segpipe` process work pool, and its `dvc-stage/stage` deployment (prefect.yaml), which
   workers on any machine pick up: `SEGPIPE_CLONE=$PWD prefect worker start --pool segpipe`;
3. `segpipe serve` on this repo: `segpipe/nightly` on its cron, `retrain/retrain` and
   `predict/predict` on demand.

    python -m flows.server [--host 127.0.0.1] [--port 4200] [-- SERVE ARGUMENTS, e.g. --on-workers]

Workers on other machines reach the server at --host: 0.0.0.0 listens on every interface (put it
behind your network's access rules: a Prefect server has no authentication of its own).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows import PROJECT_ROOT

POOL = "segpipe"  # as prefect.yaml names it
STARTUP_S = 300  # the first start migrates a new database


def healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def start_server(home: Path, host: str, port: int) -> tuple[subprocess.Popen, str]:
    """A `prefect server start` of its own home; returns it and its local API URL once it answers."""
    api = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/api"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)  # the server must not be a client of another one
    with (home / "server.log").open("a") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_S
    while not healthy(api):
        if server.poll() is not None or time.monotonic() > deadline:
            server.terminate()
            raise SystemExit(f"error: the Prefect server did not start on port {port}; see {home / 'server.log'}")
        time.sleep(1)
    return server, api


def register_pool(env: dict[str, str]) -> None:
    """The process work pool and the stage deployment on it, as prefect.yaml declares them."""
    prefect = [sys.executable, "-m", "prefect"]
    subprocess.run([*prefect, "work-pool", "create", POOL, "--type", "process", "--overwrite"],
                   env=env, check=True, cwd=PROJECT_ROOT)
    subprocess.run([*prefect, "--no-prompt", "deploy", "--all"], env=env, check=True, cwd=PROJECT_ROOT)


def stop(child: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is still there after 30 s."""
    child.terminate()
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="the server's address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=4200, help="the server's port (default 4200)")
    parser.add_argument("--home", type=Path, default=PROJECT_ROOT / ".prefect-server",
                        help="the server's PREFECT_HOME: its database and log (default .prefect-server)")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="passed on to `segpipe serve`")
    args = parser.parse_args(argv)
    # SIGTERM ends this like Ctrl-C does: through the `finally` that stops the server and serve.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server, api = start_server(args.home, args.host, args.port)
    env = {**os.environ, "PREFECT_API_URL": api}
    print(f"Prefect server: {api} (UI: {api.removesuffix('/api')}); work pool {POOL!r}", flush=True)
    serve = None
    try:
        register_pool(env)
        serve_args = [arg for arg in args.serve_args if arg != "--"]
        serve = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "serve", *serve_args],
                                 env=env, cwd=PROJECT_ROOT)
        return serve.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        for child in (serve, server):
            if child is not None:
                stop(child)


if __name__ == "__main__":
    sys.exit(main())
