"""Serving segpipe: `segpipe serve` against a real Prefect server, a predict run triggered through
the Prefect client on the trained demo repo, and the `segpipe predict|export` commands that hand
their arguments to the stage modules unchanged.

The server and the serve process are real subprocesses on 127.0.0.1, each in its own process
group with its own PREFECT_HOME, stopped at teardown whatever happened; every wait has a deadline.
"""
from __future__ import annotations

import csv
import importlib
import shutil
import sys

import pytest
from PIL import Image

from tests.pipeline_repo import env
from tests.prefect_server import RUN_S, deployments_of, prefect_api, start, stop, tail, wait_for  # noqa: F401

NIGHTLY, RETRAIN, PREDICT = "segpipe/nightly", "retrain/retrain", "predict/predict"


@pytest.fixture(scope="module")
def served(prefect_api, trained_repo, tmp_path_factory):
    """`python -m flows.pipeline serve --repo <trained repo>` against the server, once its three
    deployments are registered: yields the repo, the deployments by name and the serve log."""
    from prefect import get_client

    root = tmp_path_factory.mktemp("serve")
    log = root / "serve.log"
    serve_env = {**env(), "PREFECT_HOME": str(root / "home"), "PREFECT_API_URL": prefect_api}
    proc = start([sys.executable, "-m", "flows.pipeline", "serve", "--repo", str(trained_repo)],
                 log, serve_env)
    try:
        with get_client(sync_client=True) as client:
            deployments = wait_for(lambda: deployments_of(client, [NIGHTLY, RETRAIN, PREDICT]),
                                   "serve's deployments", proc, log)
        yield trained_repo, deployments, log
    finally:
        stop(proc)


def run_predict(**parameters):
    """A predict run triggered through the Prefect client, once it has finished (or RUN_S passed)."""
    from prefect.deployments import run_deployment

    return run_deployment(PREDICT, parameters=parameters, timeout=RUN_S, poll_interval=2)


@pytest.mark.slow
def test_serve_registers_the_nightly_pipeline_and_unscheduled_retrain_and_predict_on_the_repo(served):
    repo, deployments, _ = served
    nightly, retrain, predict = deployments[NIGHTLY], deployments[RETRAIN], deployments[PREDICT]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.parameters["repo"] == str(repo)
    assert nightly.global_concurrency_limit.limit == 1  # per deployment: predict never waits on it
    assert retrain.schedules == [] and retrain.global_concurrency_limit.limit == 1
    assert retrain.parameters["repo"] == str(repo) and "datasets" not in retrain.parameters
    assert retrain.parameter_openapi_schema["required"] == ["datasets"]  # named per run
    assert predict.schedules == [] and predict.global_concurrency_limit is None
    assert predict.parameters == {"repo": str(repo)}


@pytest.mark.slow
def test_predict_triggered_through_prefect_writes_a_mask_and_overlay_per_image_at_its_size(
    served, tmp_path
):
    repo, _, log = served
    # New data in Kvasir's raw layout, images only: no masks/ beside images/.
    new = tmp_path / "new"
    shutil.copytree(repo / "data/raw/demo/kvasir/images", new / "images")
    images = sorted((new / "images").iterdir())
    out = tmp_path / "p"

    run = run_predict(dataset="kvasir", input=str(new), out=str(out))

    assert run.state.is_completed(), f"{run.state.type}: {run.state.message}\n{tail(log)}"
    for kind in ("masks", "overlays"):
        written = sorted((out / kind).iterdir())
        assert [p.name for p in written] == [f"{p.stem}.png" for p in images]
        for image, png in zip(images, written):
            assert Image.open(png).size == Image.open(image).size, png
    with (out / "predictions.csv").open() as table:  # a row per case and class: one class here
        assert sorted(row["case_id"] for row in csv.DictReader(table)) == [p.stem for p in images]


@pytest.mark.slow
def test_predict_on_a_missing_input_fails_the_run_with_the_task_error_line(served, tmp_path):
    missing = tmp_path / "no-such-folder"

    run = run_predict(dataset="kvasir", input=str(missing), out=str(tmp_path / "p"))

    assert run.state.is_failed(), f"{run.state.type}: {run.state.message}"
    assert "error: " in run.state.message and str(missing) in run.state.message
    assert not (tmp_path / "p").exists()


@pytest.fixture
def segpipe_main(tmp_path, monkeypatch):
    """`segpipe`'s main, imported with a throwaway PREFECT_HOME; argv is restored afterwards."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    return importlib.import_module("flows.pipeline").main


@pytest.mark.parametrize("command", ["predict", "export"])
def test_segpipe_predict_and_export_show_the_stage_modules_own_help(segpipe_main, capsys, command):
    with pytest.raises(SystemExit) as done:
        segpipe_main([command, "--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith(f"usage: segpipe {command}") and "--dataset" in usage


def test_segpipe_predict_passes_arguments_unchanged_and_reports_the_stage_parser_error(
    segpipe_main, capsys, tmp_path
):
    with pytest.raises(SystemExit) as done:
        segpipe_main(["predict", "--dataset", "nope", "--input", str(tmp_path), "--out", "x"])
    assert done.value.code == 2
    assert "segpipe predict: error: argument --dataset: invalid choice: 'nope'" in capsys.readouterr().err


def test_segpipe_help_lists_every_command(segpipe_main, capsys):
    with pytest.raises(SystemExit):
        segpipe_main(["--help"])
    usage = capsys.readouterr().out
    assert all(command in usage for command in ("run", "serve", "predict", "export"))
