"""End to end: the real `dvc repro` on a shrunk demo, then what users do next (rerun nothing,
change a parameter, rerun one fold)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from segpipe.splits import read_split
from segpipe.store import CaseStore
from tests.pipeline_repo import dvc, make_repo, ran_stages, sh

DATASETS = ("kvasir", "usc_timit", "hand_xray")

pytestmark = pytest.mark.slow  # the real `dvc repro` and Prefect flow, end to end


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("pipeline"))
    result = dvc(repo, "repro")
    repo.joinpath("first_repro.log").write_text(result.stdout)
    repo.joinpath("first_outs.json").write_text(json.dumps(_outs(repo)))
    return repo


def _stage_names(repo) -> set[str]:
    return {line.split()[0] for line in dvc(repo, "stage", "list").stdout.splitlines() if line.strip()}


def test_repro_runs_every_stage_and_leaves_dvc_status_clean(repo):
    ran = ran_stages(repo.joinpath("first_repro.log").read_text())
    assert ran == _stage_names(repo)
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}


def test_every_dataset_is_evaluated_on_its_held_out_test_cases(repo):
    for name in DATASETS:
        metrics = json.loads((repo / "reports" / name / "metrics.json").read_text())
        for key in ("dice", "iou", "precision", "recall"):
            assert 0 <= metrics[key] <= 1
        test_cases = read_split(repo / "data" / "splits" / f"{name}.json").test
        assert metrics["n_cases"] == len(test_cases) > 0
        ensemble = CaseStore(repo / "data" / "predictions" / name / "ensemble.zarr")
        assert ensemble.case_ids() == sorted(test_cases)
        prob = ensemble.array(test_cases[0], "prob")
        assert prob.dtype == np.float16
    hand = json.loads((repo / "reports" / "hand_xray" / "metrics.json").read_text())
    assert len(hand["per_class"]) == 29
    usc = json.loads((repo / "reports" / "usc_timit" / "metrics.json").read_text())
    assert 0 <= usc["vs_truth"]["dice"] <= 1


def _workspace(repo: Path) -> dict[str, tuple[int, int, int]]:
    """Every workspace file (not DVC's or git's own state) with its mtime, inode and size."""
    files = {}
    for root, dirs, names in os.walk(repo):
        if root == str(repo):
            dirs[:] = [d for d in dirs if d not in {".dvc", ".git"}]
        for name in names:
            st = os.stat(os.path.join(root, name))
            files[os.path.relpath(os.path.join(root, name), repo)] = (st.st_mtime_ns, st.st_ino, st.st_size)
    return files


def test_second_repro_runs_no_stage_and_rewrites_no_file(repo):
    before, lock = _workspace(repo), (repo / "dvc.lock").read_bytes()
    result = dvc(repo, "repro")
    assert ran_stages(result.stdout) == set()
    # Every stage was checked and skipped as unchanged: none restored from the run cache either.
    skipped = {line.split("'")[1] for line in result.stdout.splitlines()
               if line.startswith("Stage '") and line.endswith("' didn't change, skipping")}
    assert skipped == _stage_names(repo)
    assert "is cached - skipping run" not in result.stdout
    # Nothing checked out again or relinked from the cache: every file is the very same inode, untouched.
    assert (repo / "dvc.lock").read_bytes() == lock
    after = _workspace(repo)
    assert after.keys() == before.keys()
    assert [path for path in before if after[path] != before[path]] == []


# Run in a process where segpipe cannot be imported: every store, every group and array in it, read
# by stock zarr-python alone; prints what it read.
STOCK_ZARR_READER = """
import json, sys
class NoSegpipe:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("segpipe", "tasks", "flows"):
            raise ImportError(f"{name} is blocked: this process reads with stock zarr only")
sys.meta_path.insert(0, NoSegpipe())
try:
    import segpipe
    sys.exit("segpipe imported")
except ImportError:
    pass
import zarr
seen = {}
for path in sys.argv[1:]:
    arrays = {}
    for name, node in zarr.open_group(path, mode="r").members(max_depth=None):
        if isinstance(node, zarr.Array):
            arrays[name] = [list(node.shape), str(node[...].dtype), dict(node.attrs)]
    seen[path] = arrays
print(json.dumps(seen))
"""


def test_every_store_of_the_run_opens_with_stock_zarr_in_a_process_without_segpipe(repo, tmp_path):
    stores = sorted(str(p) for p in (repo / "data").rglob("*.zarr") if (p / "zarr.json").is_file())
    assert len(stores) >= 4 * len(DATASETS)  # ingest, labels, members and ensemble of every dataset
    result = sh(tmp_path, sys.executable, "-c", STOCK_ZARR_READER, *stores)
    seen = json.loads(result.stdout)
    for path in stores:
        store = CaseStore(path)
        expected = {f"{case}/{name}" for case in store.case_ids() for name in store.case(case).array_keys()}
        assert set(seen[path]) == expected and expected, path
    kvasir_image = seen[str(repo / "data" / "interim" / "kvasir.zarr")]
    first = next(v for k, v in kvasir_image.items() if k.endswith("/image"))
    assert first[1] == "uint8" and first[2]["encoded_image"]["format"] == "JPEG"  # the JPEG file's bytes, as said


def test_changing_epochs_reruns_only_training_and_what_depends_on_it(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = _stage_names(repo)
    trains = {s for s in stages if s.startswith("train@")}
    plans = {s for s in stages if s.startswith("plan@")}  # the plan records the epochs it was given
    downstream = {s for s in stages if s.split("@")[0] in {"plan", "train", "infer", "ensemble", "evaluate"}}
    # dvc status names the stages whose own params changed; the rest follow once those rerun.
    assert set(json.loads(dvc(repo, "status", "--json").stdout)) == trains | plans

    one_fold = "train@kvasir-unet-0"
    assert ran_stages(dvc(repo, "repro", one_fold).stdout) == {"plan@kvasir", one_fold}
    # The other folds still wait, and what reads the new plan or model: Kvasir's inference and ensemble.
    stale = set(json.loads(dvc(repo, "status", "--json").stdout))
    assert not {one_fold, "plan@kvasir"} & stale
    assert (trains | plans) - {one_fold, "plan@kvasir"} | {"infer@kvasir-unet-0", "ensemble@kvasir"} <= stale

    ran = ran_stages(dvc(repo, "repro").stdout)
    # Nothing upstream of the plan reruns. Every training and inference does; an ensemble whose
    # members' predictions came out identical (a best epoch that did not move) is rightly skipped.
    assert ran <= downstream - {one_fold, "plan@kvasir"}
    assert {s for s in downstream if s.split("@")[0] in {"train", "infer"}} - {one_fold} <= ran
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}


def test_changing_split_k_or_seed_reruns_only_split_and_what_depends_on_it(repo):
    path = repo / "params.yaml"
    original = path.read_text()
    stages = _stage_names(repo)
    splits = {s for s in stages if s.startswith("split@")}
    upstream = {s for s in stages if s.split("@")[0] in {"demo", "ingest", "labels"}}

    # split.k (with train.folds, which must list every fold 0..k-1): the shrunk demo has too few
    # speakers for a third fold, so DVC's own status says what would rerun, without running it.
    params = yaml.safe_load(original)
    params["split"]["k"], params["train"]["folds"] = 3, [0, 1, 2]
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    after = _stage_names(repo)
    status = set(json.loads(dvc(repo, "status", "--json").stdout))
    assert splits <= status and not status & upstream
    assert status <= {s for s in after if s.split("@")[0] in {"split", "plan", "train", "infer", "ensemble", "evaluate"}}
    assert {s for s in after if s.startswith("train@") and s.endswith("-2")} <= status  # the new folds

    params = yaml.safe_load(original)
    params["split"]["seed"] += 1
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    ran = ran_stages(dvc(repo, "repro").stdout)
    downstream = {s for s in stages if s.split("@")[0] in {"plan", "train", "infer", "ensemble", "evaluate"}}
    assert splits <= ran <= splits | downstream
    # A dataset whose split came out the same keeps its models; the 12 Kvasir cases never do.
    assert {"train@kvasir-unet-0", "train@kvasir-unet-1", "evaluate@kvasir"} <= ran
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}


@pytest.fixture(scope="module")
def flow_repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("flow"))
    result = sh(repo, sys.executable, "-m", "flows.pipeline", "run", "--repo", str(repo), "--max-parallel", "2")
    return repo, json.loads(result.stdout[result.stdout.index("{"):])


def _outs(repo) -> dict[str, str]:
    """Every cached output of dvc.lock with its hash: what a run produced."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}


def test_prefect_flow_runs_the_demo_through_dvc_and_leaves_status_clean(flow_repo):
    repo, summary = flow_repo
    assert set(summary.values()) == {"ran"}
    assert set(summary) == _stage_names(repo)
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}
    for name in DATASETS:
        assert 0 <= json.loads((repo / "reports" / name / "metrics.json").read_text())["dice"] <= 1


def test_prefect_flow_and_dvc_repro_produce_the_same_artifacts(repo, flow_repo):
    # Compared with what the first `dvc repro` produced, before a test above changed params.
    assert _outs(flow_repo[0]) == json.loads(repo.joinpath("first_outs.json").read_text())
