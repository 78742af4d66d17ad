"""The end-of-demo table reads each dataset's metrics.json."""
from __future__ import annotations

import json

from tasks.summary import rows


def test_one_row_per_dataset_with_truth_only_where_measured(tmp_path):
    for name, extra in (("kvasir", {}), ("usc_timit", {"vs_truth": {"dice": 0.5}})):
        (tmp_path / name).mkdir()
        metrics = {"dice": 0.9, "iou": 0.8125, "precision": 0.95, "recall": 0.875, "n_cases": 4, **extra}
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    header, kvasir, usc = rows(tmp_path)
    assert header.split()[:2] == ["dataset", "cases"]
    assert kvasir.split() == ["kvasir", "4", "0.900", "0.812", "0.950", "0.875", "-"]
    assert usc.split()[-1] == "0.500"
