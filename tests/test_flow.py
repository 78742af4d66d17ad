"""The Prefect flow on a tiny real DVC repo: real `dvc repro`, real Prefect (temporary server).

The repo: `source` -> `work@a..d` (a matrix stage reading a param) -> `final`.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from itertools import combinations
from pathlib import Path

import pytest
import yaml

from flows.graph import UnknownTargetError, read_graph, select, topological_order

# The tests that run the flow (a Prefect server, real `dvc repro`) are marked slow; reading the
# graph is not.
# DVC's own internals (its outputs trie) warn on every index read; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ITEMS = ["a", "b", "c", "d"]
WORK = [f"work@{item}" for item in ITEMS]
ALL_STAGES = ["source", *WORK, "final"]
OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DVC_NO_ANALYTICS": "1",
}

STAGE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    import yaml

    def work(item):
        start = time.time()
        params = yaml.safe_load(Path("params.yaml").read_text())["work"]
        Path("attempts").mkdir(exist_ok=True)
        with open(f"attempts/{item}.log", "a") as log:
            log.write(f"{start}\\n")
        tries = len(Path(f"attempts/{item}.log").read_text().split())
        # `fail`: this item always fails; `flaky`: item -> how many first tries fail.
        if params["fail"] == item or tries <= params["flaky"].get(item, 0):
            sys.exit(f"boom from {item}")
        time.sleep(params["sleep"])
        value = int(Path("data/source.txt").read_text()) * params["scale"]
        Path("out").mkdir(exist_ok=True)
        record = {"value": value, "start": start, "end": time.time(),
                  "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": os.environ.get("OMP_NUM_THREADS")}
        Path(f"out/work_{item}.json").write_text(json.dumps(record))

    def final(items):
        values = [json.loads(Path(f"out/work_{i}.json").read_text())["value"] for i in items]
        Path("out/final.json").write_text(json.dumps({"total": sum(values)}))

    if __name__ == "__main__":
        step, args = sys.argv[1], sys.argv[2:]
        if step == "source":
            Path("data").mkdir(exist_ok=True)
            Path("data/source.txt").write_text("10")
        elif step == "work":
            work(args[0])
        else:
            final(args)
    """
)


def dvc(repo: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True,
                         capture_output=True, text=True)
    return out.stdout


def make_repo(root: Path, **work_params) -> Path:
    """A git + DVC repo with the tiny pipeline; `work_params` override params.yaml's `work`."""
    root.mkdir(parents=True, exist_ok=True)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "test"]):
        subprocess.run(cmd, cwd=root, check=True)
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    (root / "stage.py").write_text(STAGE_SCRIPT)
    params = {"scale": 2, "sleep": 2.0, "fail": "none", "flaky": {}, **work_params}
    (root / "params.yaml").write_text(yaml.safe_dump({"work": params}))
    stages = {
        "source": {"cmd": "python stage.py source", "deps": ["stage.py"],
                   "outs": ["data/source.txt"]},
        "work": {"matrix": {"item": ITEMS}, "cmd": "python stage.py work ${item.item}",
                 "deps": ["stage.py", "data/source.txt"], "params": ["work"],
                 "outs": ["out/work_${item.item}.json"]},
        "final": {"cmd": f"python stage.py final {' '.join(ITEMS)}",
                  "deps": [f"out/work_{item}.json" for item in ITEMS],
                  "outs": ["out/final.json"]},
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return root


def set_param(repo: Path, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["work"][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def locked_stages(repo: Path) -> set[str]:
    lock = repo / "dvc.lock"
    return set(yaml.safe_load(lock.read_text())["stages"]) if lock.exists() else set()


def interval(repo: Path, item: str) -> tuple[float, float]:
    record = json.loads((repo / f"out/work_{item}.json").read_text())
    return record["start"], record["end"]


@pytest.fixture(scope="module")
def flows_pipeline(tmp_path_factory):
    """flows.pipeline against a temporary Prefect server and home, started once per module.

    Env is set before prefect is first imported; temporary_settings covers the case where
    another test module imported prefect earlier.
    """
    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))
        mp.delenv("PREFECT_API_URL", raising=False)
        for key, value in OFFLINE_ENV.items():
            mp.setenv(key, value)
        module = importlib.import_module("flows.pipeline")
        from prefect.settings import PREFECT_HOME, temporary_settings
        from prefect.testing.utilities import prefect_test_harness

        with temporary_settings({PREFECT_HOME: home}), prefect_test_harness(120):
            yield module


@pytest.fixture(scope="module")
def first_run(flows_pipeline, tmp_path_factory):
    """One flow run on a fresh repo, shared by the tests that only read its results."""
    repo = make_repo(tmp_path_factory.mktemp("first") / "repo")
    summary = flows_pipeline.pipeline(repo=str(repo), max_parallel=2, retries=0)
    return repo, summary


def test_graph_has_dvc_yaml_edges_and_targets_pull_in_upstream(tmp_path):
    repo = make_repo(tmp_path / "repo")
    # A stage in a nested dvc.yaml is addressed as `dvc repro` in the root names it.
    (repo / "sub").mkdir()
    (repo / "sub/dvc.yaml").write_text(yaml.safe_dump({"stages": {"report": {
        "cmd": "cp ../out/final.json report.json", "deps": ["../out/final.json"],
        "outs": ["report.json"]}}}))
    graph = read_graph(repo)

    report = "sub/dvc.yaml:report"
    expected = {("source", w) for w in WORK} | {(w, "final") for w in WORK} | {("final", report)}
    assert set(graph.edges) == expected
    assert topological_order(graph) == [*ALL_STAGES, report]
    assert set(select(graph, ["work@b"])) == {"source", "work@b"}
    assert set(select(graph, ["work"])) == {"source", *WORK}  # a matrix group by its name
    assert set(select(graph, ["work@[ab]"])) == {"source", "work@a", "work@b"}  # a glob
    assert set(select(graph, ["final"])) == set(ALL_STAGES)
    assert set(select(graph, None)) == set(graph)
    with pytest.raises(UnknownTargetError, match="nope"):
        select(graph, ["nope"])


@pytest.mark.slow
def test_flow_runs_every_stage_and_leaves_dvc_status_clean(first_run):
    repo, summary = first_run
    assert summary == dict.fromkeys(ALL_STAGES, "ran")
    assert json.loads((repo / "out/final.json").read_text()) == {"total": 4 * 10 * 2}
    assert json.loads(dvc(repo, "status", "--json")) == {}
    assert locked_stages(repo) == set(ALL_STAGES)


@pytest.mark.slow
def test_independent_matrix_items_run_concurrently_up_to_max_parallel(first_run):
    repo, _ = first_run
    spans = [interval(repo, item) for item in ITEMS]
    overlapping = [(a, b) for a, b in combinations(spans, 2) if a[0] < b[1] and b[0] < a[1]]
    assert overlapping, f"no two matrix items overlapped: {spans}"
    # Never more than max_parallel=2 at once: at every start, at most 2 intervals are open.
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 2


@pytest.mark.slow
def test_changing_a_param_reruns_exactly_the_stages_that_depend_on_it(flows_pipeline, tmp_path):
    repo = make_repo(tmp_path / "repo", sleep=0.0)
    assert flows_pipeline.pipeline(repo=str(repo), retries=0) == dict.fromkeys(ALL_STAGES, "ran")
    source_mtime = (repo / "data/source.txt").stat().st_mtime_ns

    set_param(repo, "scale", 3)
    summary = flows_pipeline.pipeline(repo=str(repo), retries=0)

    assert summary == {"source": "up to date", **dict.fromkeys(WORK, "ran"), "final": "ran"}
    assert (repo / "data/source.txt").stat().st_mtime_ns == source_mtime
    assert json.loads((repo / "out/final.json").read_text()) == {"total": 4 * 10 * 3}
    assert json.loads(dvc(repo, "status", "--json")) == {}

    # Back to a value DVC has run before: its run cache restores outputs without running.
    set_param(repo, "scale", 2)
    summary = flows_pipeline.pipeline(repo=str(repo), targets=["work@a"], retries=0)
    assert summary == {"source": "up to date", "work@a": "restored"}


@pytest.mark.slow
def test_failing_stage_fails_the_flow_by_name_and_skips_downstream(flows_pipeline, tmp_path):
    repo = make_repo(tmp_path / "repo", sleep=0.0, fail="c")

    with pytest.raises(flows_pipeline.PipelineFailed) as failure:
        flows_pipeline.pipeline(repo=str(repo), max_parallel=2, retries=1, retry_delay_s=0.5)

    message = str(failure.value)
    assert "work@c" in message and "boom from c" in message  # the stage and DVC's output
    assert failure.value.summary == {"source": "ran", "work@a": "ran", "work@b": "ran",
                                     "work@c": "failed", "work@d": "ran", "final": "not run"}
    assert len((repo / "attempts/c.log").read_text().splitlines()) == 2  # first try + 1 retry
    assert not (repo / "out/final.json").exists()
    assert locked_stages(repo) == {"source", "work@a", "work@b", "work@d"}


@pytest.mark.slow
def test_a_transient_failure_is_retried_with_backoff_and_the_downstream_stages_then_run(flows_pipeline, tmp_path):
    repo = make_repo(tmp_path / "repo", sleep=0.0, flaky={"b": 2})

    summary = flows_pipeline.pipeline(repo=str(repo), max_parallel=2, retries=2, retry_delay_s=1.0)

    assert summary == dict.fromkeys(ALL_STAGES, "ran")
    tries = [float(t) for t in (repo / "attempts/b.log").read_text().split()]
    assert len(tries) == 3
    assert tries[1] - tries[0] >= 1.0 and tries[2] - tries[1] >= 2.0  # backoff: 1 s, then 2 s
    assert json.loads((repo / "out/final.json").read_text()) == {"total": 4 * 10 * 2}
    assert json.loads(dvc(repo, "status", "--json")) == {}


@pytest.mark.slow
def test_cli_runs_targets_against_its_own_temporary_server(tmp_path):
    repo = make_repo(tmp_path / "repo")
    env = {**os.environ, **OFFLINE_ENV, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    out = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "run", "--repo", str(repo),
         "--targets", "source", "--retries", "0"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout[out.stdout.index("{"):]) == {"source": "ran"}
    assert locked_stages(repo) == {"source"}


@pytest.mark.slow
def test_serve_builds_a_cron_deployment_of_the_flow(flows_pipeline):
    params = {"repo": "/data/segpipe", "targets": None, "max_parallel": 4, "retries": 1,
              "verify": True}
    deployment = flows_pipeline.deployment("nightly", "0 2 * * *", params)
    assert deployment.name == "nightly"
    assert deployment.entrypoint.endswith("flows/pipeline.py:pipeline")
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert deployment.concurrency_limit == 1  # held by the server, per deployment
    assert deployment.parameters == params


def test_each_of_the_stages_running_at_once_gets_its_own_gpu_while_there_are_enough(monkeypatch):
    from flows.pipeline import gpu_of_slot, visible_gpus

    assert [gpu_of_slot(slot, ["0", "1", "2", "3"]) for slot in range(2)] == ["0", "1"]
    assert [gpu_of_slot(slot, ["4", "7"]) for slot in range(3)] == ["4", "7", "4"]  # more stages than GPUs
    assert gpu_of_slot(0, []) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert visible_gpus() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


@pytest.mark.slow
def test_stages_running_at_once_never_share_a_gpu_and_split_the_cores(flows_pipeline, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the flow's GPUs; the stages see one each
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    repo = make_repo(tmp_path / "repo", sleep=1.5)
    flows_pipeline.pipeline(repo=str(repo), max_parallel=2, retries=0)
    records = {item: json.loads((repo / f"out/work_{item}.json").read_text()) for item in ITEMS}
    assert {record["gpu"] for record in records.values()} == {"3", "5"}
    assert {record["threads"] for record in records.values()} == {str(max(1, (os.cpu_count() or 1) // 2))}
    overlapping = [(a, b) for a, b in combinations(ITEMS, 2)
                   if max(interval(repo, a)[0], interval(repo, b)[0]) < min(interval(repo, a)[1], interval(repo, b)[1])]
    assert overlapping, "no two stages ran at once"
    for a, b in overlapping:
        assert records[a]["gpu"] != records[b]["gpu"], (a, b)


def test_retrain_targets_a_datasets_evaluation_or_only_the_folds_of_some_archs():
    from flows.pipeline import retrain_targets

    graph = read_graph(PROJECT_ROOT)
    whole = set(select(graph, retrain_targets(["kvasir"], None)))
    assert {"evaluate@kvasir", "ensemble@kvasir", "train@kvasir-unet-0", "ingest@kvasir"} <= whole
    assert not any("hand_xray" in stage or "usc_timit" in stage for stage in whole)
    some = set(select(graph, retrain_targets(["kvasir", "usc_timit"], ["unet"])))
    assert {"train@kvasir-unet-0", "infer@usc_timit-unet-1"} <= some
    assert not any(stage.startswith(("ensemble@", "evaluate@")) or "hand_xray" in stage for stage in some)
