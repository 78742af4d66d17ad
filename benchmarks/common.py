"""What every benchmark shares: the stages' process settings, and the machine a figure comes from."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from segpipe.step_time import cpu_model
from tasks.common import MALLOC_ENV

ROOT = Path(__file__).resolve().parents[1]


def start_as_stages_do() -> None:
    """Run this benchmark in a process started as dvc.yaml starts the stages that run models: with
    glibc's malloc settings (MALLOC_ENV), which a process reads only when it starts. Re-executes
    itself once when they are missing."""
    if any(os.environ.get(key) != value for key, value in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **MALLOC_ENV})


def machine() -> dict[str, Any]:
    """Where a figure was measured: CPU model, cores, Python, segpipe's commit, date (UTC)."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def emit(result: dict[str, Any]) -> None:
    """Print a benchmark's result as one JSON line, with the machine it ran on."""
    print(json.dumps({**result, "machine": machine()}))


def copy_source_tree(dest: Path) -> None:
    """Copy this working tree's source files (tracked and new, never ignored ones such as data) to `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
        capture_output=True, text=True, check=True,
    ).stdout.split()
    for rel in listed:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
