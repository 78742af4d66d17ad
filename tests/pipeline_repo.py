"""A real copy of this repository, shrunk through params.yaml, for end-to-end `dvc repro` and
Prefect tests. Same code, same dvc.yaml, only smaller data, models and epochs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from benchmarks.common import copy_source_tree

SMALL_PARAMS = {
    "demo": {
        "seed": 0,
        "kvasir": {"n_cases": 12, "min_size": 64, "max_size": 96},
        "usc_timit": {"n_speakers": 3, "videos_per_speaker": 1, "n_frames": 12, "warmup_frames": 2, "size": 68, "fps": 23.18},
        "hand_xray": {"n_patients": 3, "n_test_patients": 1, "size": 256},
    },
    "image_size": {"kvasir": [32, 32], "usc_timit": [32, 32], "hand_xray": [64, 64]},
    "split": {"k": 2, "seed": 0, "test_fraction": 0.25},
    "train": {"folds": [0, 1], "epochs": 2, "steps_per_epoch": 3, "channels": [8, 16, 32], "per_dataset": {}},
}


def shrink(params: dict) -> dict:
    params["demo"] = SMALL_PARAMS["demo"]
    for name, size in SMALL_PARAMS["image_size"].items():
        params["datasets"][name]["image_size"] = size
    params["split"].update(SMALL_PARAMS["split"])
    params["train"].update(SMALL_PARAMS["train"])
    return params


def env() -> dict[str, str]:
    """The stages' `python` must be this interpreter; Prefect state goes to a per-run home."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DO_NOT_TRACK": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        # Bitwise-equal artifacts from `dvc repro` and the flow need the same torch thread count.
        "OMP_NUM_THREADS": "1",
    }


def sh(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=repo, env={**env(), "PREFECT_HOME": str(repo / ".prefect")},
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh(repo, sys.executable, "-m", "dvc", *args, check=check)


def make_repo(dest: Path) -> Path:
    """Copy the working tree's source files (tracked and new, never data) into a fresh git + DVC repo."""
    copy_source_tree(dest)
    params = dest / "params.yaml"
    params.write_text(yaml.safe_dump(shrink(yaml.safe_load(params.read_text())), sort_keys=False))
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    sh(dest, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "test repo")
    return dest


def ran_stages(output: str) -> set[str]:
    """Stage names from `dvc repro` output lines like: Running stage 'train@kvasir-unet-0':"""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}
