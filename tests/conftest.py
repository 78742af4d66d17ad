"""Shared fixtures: offline settings, the real sample data, and small real Zarr stores."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def require_shared_data() -> Path:
    """The real sample data beside the repo; CI always has it, a user's fresh clone may not."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the real sample data at {SHARED_DATA}")
        pytest.skip(f"real sample data not found at {SHARED_DATA} (it lives beside the repo as ../shared/data)")
    return SHARED_DATA


def disc_case(rng: np.random.Generator, size: int = 48, channels: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with one bright disc, and its (1, H, W) mask: learnable in a few steps."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
    r = rng.uniform(size * 0.12, size * 0.25)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
    image = np.clip(60 + 120 * mask + rng.normal(0, 20, mask.shape), 0, 255).astype(np.uint8)
    if channels:
        image = np.repeat(image[..., None], channels, axis=-1)
    return image, mask[None]


@pytest.fixture
def disc_stores(tmp_path):
    """An ingest-like image store and a labels store of 12 disc cases in 6 groups."""
    from segpipe.store import CaseStore

    rng = np.random.default_rng(0)
    images = CaseStore.create(tmp_path / "images.zarr", dataset="discs", classes=["disc"])
    labels = CaseStore.create(tmp_path / "labels.zarr", dataset="discs", classes=["disc"])
    for i in range(12):
        image, mask = disc_case(rng)
        attrs = {"group": f"g{i // 2}", "kind": "image", "original_size": list(image.shape)}
        for store in (images, labels):
            store.write_case(f"case{i:02d}", attrs)
        images.write_array(f"case{i:02d}", "image", image)
        labels.write_array(f"case{i:02d}", "mask", mask)
    return images, labels


@pytest.fixture(scope="session")
def phantom(tmp_path_factory) -> Path:
    """The small demo rtMRI phantom (tests/usc_phantom.py) written once: AVIs plus true masks."""
    from segpipe.datasets import demo_usc
    from tests.usc_phantom import VIDEOS

    root = tmp_path_factory.mktemp("usc")
    demo_usc.write(root, VIDEOS, seed=0)
    return root


@pytest.fixture
def shared_data() -> Path:
    return require_shared_data()


# Mark for tests that read ../shared/data: skipped with the reason when absent, failed under CI.
needs_shared_data = pytest.mark.usefixtures("shared_data")


@pytest.fixture(scope="session")
def trained_repo(tmp_path_factory) -> Path:
    """A shrunk demo repo after a full `dvc repro`: trained members, tuned ensembles, and the raw
    demo files. Shared by every test that uses a trained model (predict, export, the predict
    deployment), so none of them may change it: copy what you need to edit."""
    from tests.pipeline_repo import dvc, make_repo

    repo = make_repo(tmp_path_factory.mktemp("trained"))
    dvc(repo, "repro")
    return repo
