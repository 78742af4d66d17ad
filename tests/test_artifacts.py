"""The flow's evaluation artifacts: a markdown summary and a table per evaluated dataset, read from
its metrics.json, stored by a real (temporary) Prefect server."""
import json

import pytest


METRICS = {"dice": 0.81234, "iou": 0.7, "precision": 0.9, "recall": 0.75, "hd95": 3.5, "nsd": 0.88,
           "n_cases": 3, "n_samples": 3, "members": {"unet-fold0": {"dice": 0.8, "iou": 0.69, "precision": 0.9,
                                                                    "recall": 0.7, "hd95": 4.0, "nsd": 0.85}}}


@pytest.fixture
def prefect_server(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(180):
        yield


def test_an_evaluated_dataset_gets_a_markdown_and_a_table_artifact(prefect_server, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.artifacts import publish_evaluation

    (tmp_path / "reports" / "hand_xray").mkdir(parents=True)
    (tmp_path / "reports" / "hand_xray" / "metrics.json").write_text(json.dumps(METRICS))

    @flow
    def evaluated() -> list[str]:
        # kvasir failed: no artifact from whatever metrics.json an earlier run left
        return publish_evaluation(str(tmp_path), {"evaluate@hand_xray": "up to date", "evaluate@kvasir": "failed",
                                                  "train@hand_xray-unet-0": "ran"})

    assert evaluated() == ["evaluation-hand-xray"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["evaluation-hand-xray", "evaluation-hand-xray-table"])))
    by_type = {a.type: a for a in found}
    assert set(by_type) == {"markdown", "table"}
    assert "| ensemble | 0.8123 | 0.7 | 0.9 | 0.75 | 3.5 | 0.88 |" in by_type["markdown"].data
    rows = json.loads(by_type["table"].data) if isinstance(by_type["table"].data, str) else by_type["table"].data
    assert [r["model"] for r in rows] == ["ensemble", "unet-fold0"] and rows[0]["dice"] == 0.8123
