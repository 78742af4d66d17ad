"""The `evaluate` stage as `dvc repro` ran it on the shrunk demo: every dataset gets its metrics,
per-case, per-class and per-frame tables, and its report, and the tables agree with the metrics."""
import csv
import json

import pytest

from segpipe.splits import read_split
from segpipe.store import CaseStore

pytestmark = pytest.mark.slow  # reads the session's trained demo (a full `dvc repro`)

DATASETS = ("kvasir", "usc_timit", "hand_xray")


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_gets_its_tables_and_report(trained_repo, dataset):
    folder = trained_repo / "reports" / dataset
    metrics = json.loads((folder / "metrics.json").read_text())
    cases = read_split(trained_repo / "data" / "splits" / f"{dataset}.json").test
    classes = CaseStore(trained_repo / "data" / "labels" / f"{dataset}.zarr").classes
    members = sorted(metrics["members"])
    assert members == ["unet-fold0", "unet-fold1"]
    for key in ("dice", "iou", "precision", "recall", "nsd"):
        assert 0 <= metrics[key] <= 1 and all(0 <= m[key] <= 1 for m in metrics["members"].values())
    assert metrics["hd95"] >= 0 and metrics["n_cases"] == len(cases)

    per_case = rows(folder / "per_case.csv")
    assert len(per_case) == (1 + len(members)) * len(cases) * len(classes)
    assert [r["member"] for r in per_case[:: len(cases) * len(classes)]] == ["ensemble", *members]
    per_class = rows(folder / "per_class.csv")
    assert [r["class"] for r in per_class] == classes
    assert sum(float(r["nsd"]) for r in per_class) / len(classes) == pytest.approx(metrics["nsd"], abs=1e-5)
    per_frame = rows(folder / "per_frame.csv")
    assert len(per_frame) == metrics["n_samples"] * len(classes)
    assert sum(float(r["dice"]) for r in per_frame) / len(per_frame) == pytest.approx(metrics["dice"], abs=1e-5)
    page = (folder / "report.html").read_text()
    assert page.index("<table>") < page.index("<img") and (folder / "report.md").is_file()
    assert sorted(p.name for p in (folder / "figures").glob("*.png"))


def test_video_frames_carry_their_time(trained_repo):
    fps = CaseStore(trained_repo / "data" / "interim" / "usc_timit.zarr")
    for row in rows(trained_repo / "reports" / "usc_timit" / "per_frame.csv"):
        rate = fps.case_attrs(row["case"])["fps"]
        assert float(row["time_s"]) == pytest.approx(int(row["frame"]) / rate, abs=1e-6)
