"""Prefect artifacts of the evaluation: after the flow has run the `evaluate` stages (through DVC,
in subprocesses), a markdown summary and a table per dataset, read from reports/<dataset>/metrics.json,
so the Prefect UI shows each run's test figures beside its logs.

The flow calls `publish_evaluation(repo, summary)` once its stages are done; artifact keys are
stable per dataset (`evaluation-<dataset>`), so the UI lists each key's history run by run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.stage import RAN, RESTORED, UP_TO_DATE

STAGE = "evaluate@"
DONE = (RAN, RESTORED, UP_TO_DATE)  # the outcomes of a stage that succeeded
COLUMNS = ("dice", "iou", "precision", "recall", "hd95", "nsd")


def artifact_key(kind: str, name: str) -> str:
    """`kind-name` as a Prefect key: lowercase letters, digits and dashes only."""
    return f"{kind}-" + "".join(c if c.isalnum() else "-" for c in name.lower())


def table_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The ensemble's headline and each member's, rounded for reading."""
    rows = [{"model": "ensemble", **{c: metrics.get(c) for c in COLUMNS}}]
    rows += [{"model": name, **{c: m.get(c) for c in COLUMNS}} for name, m in metrics.get("members", {}).items()]
    return [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows]


def summary_markdown(dataset: str, metrics: dict[str, Any], report: Path) -> str:
    rows = table_rows(metrics)
    lines = [f"# Evaluation of {dataset}",
             f"{metrics.get('n_cases', '?')} held-out test cases, {metrics.get('n_samples', '?')} labelled frames; "
             f"the full report: `{report}`.", "",
             "| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += ["| " + " | ".join(str(r[k]) for k in ("model", *COLUMNS)) + " |" for r in rows]
    if "vs_truth" in metrics:
        lines += ["", f"Against the demo's true masks: Dice {metrics['vs_truth']['dice']:.4f}."]
    return "\n".join(lines) + "\n"


@task(name="evaluation-artifacts", cache_policy=NO_CACHE)
def publish_evaluation(repo: str, summary: dict[str, str]) -> list[str]:
    """A markdown and a table artifact for each dataset whose `evaluate` stage the flow brought up to
    date (ran, restored or already current), from its metrics.json; returns the keys created."""
    keys = []
    for stage in sorted(s for s, outcome in summary.items() if s.startswith(STAGE) and outcome in DONE):
        dataset = stage[len(STAGE):]
        folder = Path(repo) / "reports" / dataset
        if not (folder / "metrics.json").is_file():
            continue
        metrics = json.loads((folder / "metrics.json").read_text())
        key = artifact_key("evaluation", dataset)
        create_markdown_artifact(markdown=summary_markdown(dataset, metrics, folder / "report.html"), key=key,
                                 description=f"test metrics of the {dataset} ensemble and its members")
        create_table_artifact(table=table_rows(metrics), key=f"{key}-table",
                              description=f"test metrics of the {dataset} ensemble and its members")
        keys.append(key)
    return keys
