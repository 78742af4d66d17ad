"""One DVC stage run in a repo: `dvc repro --single-item <stage>` in a subprocess, its output
streamed into the Prefect run's logs, and its outcome (ran, restored from the run cache, up to date)
read from what DVC prints."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

RAN, RESTORED, UP_TO_DATE, FAILED, NOT_RUN = "ran", "restored", "up to date", "failed", "not run"
TAIL_LINES = 40  # of DVC's output, quoted in the error of a failed stage


class StageFailed(RuntimeError):
    """One stage's `dvc repro` failed; the message names the stage and quotes DVC's output."""


def dvc_command(*args: str) -> list[str]:
    # `-m dvc` pins the dvc of this interpreter. --wait-for-lock: concurrent `dvc repro -s`
    # processes take turns on the repo lock to hash and commit outputs; without it a process
    # gives up after 3 s and loses a finished stage (seen with 6 stages of 6,000-file outputs).
    return [sys.executable, "-m", "dvc", "--wait-for-lock", *args]


def stage_env(threads: int | None, gpu: str | None = None) -> dict[str, str]:
    # Stage commands say `python -m tasks...`: put this interpreter first on PATH so they run
    # in the flow's environment even when it was started as `.venv/bin/python` unactivated.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Stages running at once share the cores: torch spinning more threads than cores makes two
    # concurrent trainings several times slower than one after the other.
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    if gpu is not None:  # the stage sees its one GPU as cuda:0
        env["CUDA_VISIBLE_DEVICES"] = gpu
    # Unbuffered, so that a command's prints reach the log as they happen, in order with its errors.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# What `dvc repro` prints for each outcome (DVC 3.x wording), in order of precedence.
MARKERS = {
    RAN: "Running stage '{}'",
    RESTORED: "Stage '{}' is cached",  # run cache: same cmd, deps, params ran before
    UP_TO_DATE: "'{}' didn't change, skipping",
}


def outcome_of(seen: set[str]) -> str:
    """The outcome, given those of MARKERS the output contained. Output that matches none
    counts as ran: wrongly claiming "up to date" would hide a change."""
    return next((outcome for outcome in MARKERS if outcome in seen), RAN)


def run_logged(cmd: list[str], cwd: str, env: dict[str, str],
               watch: Callable[[str], None] = lambda line: None) -> tuple[int, list[str]]:
    """Run `cmd` in `cwd`, logging its output (stderr merged in) line by line as it comes, so
    that a long run logs as it goes; `watch` sees each line too. Returns the exit code and the
    last TAIL_LINES lines, for the error of a failed run."""
    logger = get_run_logger()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if not line:
            continue  # DVC spaces its hints with blank lines; in a log they are noise
        logger.info("%s", line)
        tail.append(line)
        watch(line)
    return proc.wait(), list(tail)


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(repo: str, stage: str, threads: int | None, gpu: str | None = None) -> str:
    """Run one stage through DVC; return RAN, RESTORED or UP_TO_DATE. No Prefect caching:
    DVC decides whether the stage is up to date."""
    seen: set[str] = set()
    code, tail = run_logged(
        dvc_command("repro", "--single-item", stage), repo, stage_env(threads, gpu),
        watch=lambda line: seen.update(o for o, m in MARKERS.items() if m.format(stage) in line),
    )
    if code != 0:
        raise StageFailed(
            f"stage {stage!r} failed: `dvc repro --single-item {stage}` exited with "
            f"{code}; its last lines:\n" + "\n".join(tail)
        )
    outcome = outcome_of(seen)
    get_run_logger().info("stage %s: %s", stage, outcome)
    return outcome
