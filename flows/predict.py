"""The `predict` flow: a repo's trained ensemble on new images, as a Prefect deployment.

A flow run is one `python -m tasks.predict` process in the repo, so a served run writes exactly
what `segpipe predict` writes at the command line (masks/, overlays/, predictions.csv,
predictions.zarr under `out`). Its output streams into the run's logs; a bad input fails the run
with the task's one-line `error: ...` first in the run's message. `segpipe serve` serves this
deployment beside the nightly pipeline; trigger it with, e.g.:

    prefect deployment run predict/predict -p dataset=kvasir -p input=/data/new -p out=/data/masks
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from prefect import flow

from flows.pipeline import threads_per_stage
from flows.stage import run_logged, stage_env


class PredictFailed(RuntimeError):
    """`python -m tasks.predict` failed; the message leads with its `error: ...` line."""


def predict_command(dataset: str, input: str, out: str, on_error: str | None) -> list[str]:
    command = [sys.executable, "-m", "tasks.predict", "--dataset", dataset, "--input", input,
               "--out", out]
    return command + (["--on-error", on_error] if on_error else [])


def failure_message(code: int, tail: list[str]) -> str:
    """The task's error line first (its stage boundary prints one, `error: ...`; argparse prints
    `<prog>: error: ...`), so that it is what a run's state shows, then its last lines."""
    errors = [line for line in tail if line.startswith("error: ") or ": error: " in line]
    return "\n".join([*errors[-1:], f"`python -m tasks.predict` exited with {code}; its last lines:",
                      *tail])


@flow(name="predict")
def predict(
    dataset: str,
    input: str,
    out: str,
    repo: str = ".",
    on_error: Literal["fail", "skip"] | None = None,
) -> str:
    """Segment the images at `input` (a file or a folder) with the trained ensemble of `dataset`
    in the DVC repo `repo`, writing masks, overlays and predictions.csv under `out`; relative
    paths are relative to `repo`. `on_error`: what one unreadable image does (the task's default
    when None). Returns the output folder."""
    root = Path(repo).resolve()
    code, tail = run_logged(predict_command(dataset, input, out, on_error), str(root),
                            stage_env(threads_per_stage(1)))
    if code != 0:
        raise PredictFailed(failure_message(code, tail))
    return str(root / out)


def deployment(repo: str):
    """The on-demand deployment `segpipe serve` runs beside the nightly one: no schedule, and
    `repo` defaults to the served repo."""
    return predict.to_deployment(name="predict", parameters={"repo": repo})
