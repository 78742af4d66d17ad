"""A `train` stage killed under the real `dvc repro` resumes by itself when it is run again (as a
Prefect retry does), and ends with the very bytes of an uninterrupted run: checkpoints, DVCLive
metrics and plots, and dvc.lock."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.pipeline_repo import dvc, env, make_repo, ran_stages

pytestmark = pytest.mark.slow  # the real `dvc repro` of one dataset's upstream stages and one train stage

STAGE = "train@kvasir-unet-0"
EPOCHS = 40  # a few seconds of training: time to kill it after its epoch 1
MODEL = Path("models/kvasir/unet/fold0")
WORK = MODEL.with_name(".fold0.partial.tmp")  # segpipe.atomic.resumable_dir's work folder
LIVE = Path("reports/kvasir/train/unet-fold0")


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> tuple[Path, Path]:
    """Two copies of a shrunk repo with longer training, everything upstream of STAGE run once."""
    repo = make_repo(tmp_path_factory.mktemp("resume") / "killed")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update({"epochs": EPOCHS, "patience": EPOCHS, "top_k": 2})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(repo, "repro", "plan@kvasir")
    return repo, Path(shutil.copytree(repo, repo.with_name("whole"), symlinks=True))


def _repro(repo: Path, *args: str) -> subprocess.Popen:
    """`dvc repro` in its own process group, so that a kill reaches the stage it runs too."""
    return subprocess.Popen([sys.executable, "-m", "dvc", "repro", *args], cwd=repo, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finished_epoch(work: Path) -> int:
    try:
        return torch.load(work / "last.pt", weights_only=True)["meta"]["epoch"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def _kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    while True:  # until the stage's own process is gone too
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _locked(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"][STAGE]


def test_a_killed_train_stage_resumes_under_dvc_repro_and_ends_as_an_uninterrupted_run(repos):
    killed_repo, whole_repo = repos
    whole, killed = _repro(whole_repo, "--single-item", STAGE), _repro(killed_repo, "--single-item", STAGE)
    while _finished_epoch(killed_repo / WORK) < 1:
        assert killed.poll() is None, f"finished before it could be killed:\n{killed.communicate()[0]}"
        time.sleep(0.02)
    _kill_group(killed)
    stopped_at = _finished_epoch(killed_repo / WORK)
    assert 1 <= stopped_at < EPOCHS - 1 and not (killed_repo / MODEL).exists()

    # What a Prefect retry runs: no flag, no `dvc commit`.
    rerun = _repro(killed_repo, "--single-item", STAGE)
    out = rerun.communicate()[0]
    assert rerun.returncode == 0, out
    assert f"resumed after epoch {stopped_at}" in out and ran_stages(out) == {STAGE}
    assert whole.wait() == 0, whole.communicate()[0]
    assert dvc(killed_repo, "status", "--json", "--with-deps", STAGE).stdout.strip() == "{}"
    assert not (killed_repo / WORK).exists()

    for folder in (MODEL, LIVE):  # checkpoints, and DVCLive's metrics.json and plots
        assert _files(killed_repo / folder) == _files(whole_repo / folder), folder
    assert _locked(killed_repo) == _locked(whole_repo)

    again = dvc(killed_repo, "repro", STAGE)
    assert ran_stages(again.stdout) == set()
