"""The plan stage in the real `dvc repro`, on the shrunk demo's Kvasir chain, with the data in a
user's own folder: re-planning to the same values reruns nothing, an override reaches the model,
and a changed raw file changes the plan and retrains."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.pipeline_repo import dvc, make_repo, ran_stages

pytestmark = pytest.mark.slow  # the real `dvc repro`, end to end


def set_params(repo, update) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    update(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def kvasir_status(repo) -> set[str]:
    """Kvasir's stages that `dvc status` calls changed (the other datasets are never run here)."""
    return {name for name in json.loads(dvc(repo, "status", "--json").stdout) if "@kvasir" in name}


def plan_of(repo) -> dict:
    return json.loads((repo / "plans" / "kvasir.json").read_text())


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("plan"))
    dvc(repo, "repro", "demo")
    shutil.copytree(repo / "data" / "raw" / "demo" / "kvasir", repo / "userdata" / "kvasir")
    set_params(repo, lambda p: p["datasets"]["kvasir"].update(raw="userdata/kvasir"))
    dvc(repo, "repro", "evaluate@kvasir")
    return repo


def test_replanning_to_the_same_values_reruns_nothing(repo):
    before = (repo / "plans" / "kvasir.json").read_bytes()
    assert ran_stages(dvc(repo, "repro", "--force", "--single-item", "plan@kvasir").stdout) == {"plan@kvasir"}
    assert (repo / "plans" / "kvasir.json").read_bytes() == before
    assert kvasir_status(repo) == set()


def test_an_explicit_param_wins_over_the_plan_and_reaches_the_trained_model(repo):
    set_params(repo, lambda p: p["train"]["per_dataset"].update(kvasir={"channels": [8, 16]}))
    ran = ran_stages(dvc(repo, "repro", "evaluate@kvasir").stdout)
    assert {"plan@kvasir", "train@kvasir-unet-0", "train@kvasir-unet-1"} <= ran
    assert not {"ingest@kvasir", "labels@kvasir", "split@kvasir"} & ran
    assert plan_of(repo)["plan"]["channels"] == {
        "value": [8, 16], "source": "override", "why": "set in params.yaml (train.per_dataset.kvasir.channels)"}
    meta = torch.load(repo / "models" / "kvasir" / "unet" / "fold0" / "best.pt", weights_only=True)["meta"]
    assert meta["channels"] == [8, 16]
    assert kvasir_status(repo) == set()


def test_a_changed_raw_file_changes_the_plan_and_retrains(repo):
    before = plan_of(repo)["fingerprint"]["intensity"]
    case = json.loads((repo / "data" / "splits" / "kvasir.json").read_text())["folds"][0]["val"][0]
    path = repo / "userdata" / "kvasir" / "images" / f"{case}.jpg"
    brighter = np.clip(np.asarray(Image.open(path)).astype(np.int16) + 60, 0, 255).astype(np.uint8)
    Image.fromarray(brighter).save(path, quality=95)
    ran = ran_stages(dvc(repo, "repro", "evaluate@kvasir").stdout)
    assert {"ingest@kvasir", "plan@kvasir", "train@kvasir-unet-0", "train@kvasir-unet-1"} <= ran
    assert plan_of(repo)["fingerprint"]["intensity"] != before
    assert kvasir_status(repo) == set()
