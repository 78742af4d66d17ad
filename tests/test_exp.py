"""Comparing runs as the README shows it: `dvc exp run -S ...`, then `dvc exp show`, `dvc metrics
diff` and `dvc plots diff`, on a copy of the trained shrunk demo. Changing the surface tolerance
reruns only the evaluation, and the JSON each command prints says what changed."""
import json
import shutil

import pytest

from tests.pipeline_repo import dvc, ran_stages, sh

pytestmark = pytest.mark.slow  # a copy of the trained demo (the session's `dvc repro`)

GIT = ("git", "-c", "user.name=t", "-c", "user.email=t@t")


@pytest.fixture(scope="module")
def experiment(trained_repo, tmp_path_factory):
    """A copy of the trained demo, its results committed, then one experiment: tolerance 2 -> 4 px.
    (The copy holds files, not links: DVC's cache links stay with the read-only original.)"""
    repo = tmp_path_factory.mktemp("exp") / "repo"
    shutil.copytree(trained_repo, repo, symlinks=True)
    sh(repo, *GIT, "add", "-A")
    sh(repo, *GIT, "commit", "-qm", "trained demo")
    run = dvc(repo, "exp", "run", "-S", "evaluate.surface_tolerance_px=4", "--name", "tol4")
    return repo, run.stdout


def test_a_new_tolerance_reruns_only_the_evaluation(experiment):
    repo, output = experiment
    assert ran_stages(output) == {"evaluate@kvasir", "evaluate@usc_timit", "evaluate@hand_xray"}


def test_exp_show_lists_the_experiment_with_its_param_and_metrics(experiment):
    repo, _ = experiment
    revs = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    exps = [e for rev in revs for e in rev.get("experiments") or [] if e.get("name") == "tol4"]
    assert len(exps) == 1
    data = exps[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["evaluate"]["surface_tolerance_px"] == 4
    for name in ("kvasir", "usc_timit", "hand_xray"):
        metrics = data["metrics"][f"reports/{name}/metrics.json"]["data"]
        assert {"dice", "hd95", "nsd", "members"} <= set(metrics)


def test_metrics_diff_shows_surface_dice_rising_and_overlap_unchanged(experiment):
    repo, _ = experiment
    diff = json.loads(dvc(repo, "metrics", "diff", "--json").stdout)  # committed run -> the experiment's
    changed = {key for per_file in diff.values() for key in per_file}
    assert changed and all(key.split(".")[-1] == "nsd" for key in changed)  # only NSD depends on the tolerance
    assert all(v["new"] >= v["old"] for per_file in diff.values() for v in per_file.values())  # a looser tolerance
    assert any(v["new"] > v["old"] for per_file in diff.values() for v in per_file.values())


def test_plots_diff_gives_both_runs_of_the_per_class_plot(experiment):
    repo, _ = experiment
    plots = json.loads(dvc(repo, "plots", "diff", "HEAD", "--json").stdout)["data"]
    values = plots["reports/kvasir/per_class.csv"][0]["content"]["data"]["values"]
    assert {v["rev"] for v in values} == {"HEAD", "workspace"}
