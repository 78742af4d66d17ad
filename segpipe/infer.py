"""Inference: per-class sigmoid probabilities of a store's cases, written to a Zarr store as float16.

The arithmetic (normalisation, resizing, test-time flips, the sliding window and its blending, the
rounding to float16) lives in segpipe.infer_core, which an exported bundle runs too; this module
adds the stores and the jobs around it. Two modes, chosen by the checkpoint's meta (`tile_scale`):
whole-image cases are one job each; a tiled image is read band by band from Zarr, a job per band of
`InferConfig.band_rows` rows, and its finished rows go to the output array in whole chunk rows
while the model runs the next tiles (store.WritesBehind).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from segpipe import infer_core
from segpipe.atomic import Owner, atomic_dir
from segpipe.config import InferConfig, tile_extent
from segpipe.errors import StoreError
from segpipe.infer_core import Array, predict_frames
from segpipe.parallel import map_tracked
from segpipe.store import CaseStore, WritesBehind, frames_of
from segpipe.tiling import row_bands
from segpipe.train import load_model

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

CASE_ATTRS = ("group", "kind", "original_size", "fps", "warmup_frames")


def meta_tile_extent(meta: dict[str, Any]) -> tuple[int, int] | None:
    """The full-resolution (h, w) one tile of this checkpoint's model covers; None for whole-image models."""
    return tile_extent(meta["image_size"], meta.get("tile_scale"))


def predict_tiled(
    model: nn.Module,
    meta: dict[str, Any],
    image: Array,
    out: Array,
    cfg: InferConfig,
    device: torch.device,
    rows: tuple[int, int] | None = None,
    chunk: int = 512,
) -> None:
    """Tiled mode (segpipe.infer_core.predict_tiled): probabilities of image rows [r0, r1) (default:
    all) of an (H, W[, C]) image into `out[:, r0:r1]` of a (K, H, W) float16 array, written in runs
    of whole `chunk` rows, each while the model runs the next tiles."""
    extent = meta_tile_extent(meta)
    if extent is None:
        raise ValueError("predict_tiled needs a model trained on tiles (meta tile_scale)")
    with WritesBehind(out) as writes:

        def write(r0: int, r1: int, probs: np.ndarray) -> None:
            writes.write((slice(None), slice(r0, r1)), probs)

        infer_core.predict_tiled(model, meta, extent, image, write, cfg, device, rows, chunk)


@dataclass(frozen=True)
class Job:
    """One unit of Dask work: a whole case, or a band of image rows of a tiled case."""

    checkpoint: str
    images: str
    out: str
    case_id: str
    cfg: InferConfig
    device: str
    rows: tuple[int, int] | None = None


@lru_cache(maxsize=2)
def _model(checkpoint: str, modified_ns: int, device: str) -> tuple[nn.Module, dict[str, Any]]:
    """Each worker loads a checkpoint once; the file's mtime in the key drops a model retrained since."""
    return load_model(Path(checkpoint), torch.device(device))


def cached_model(checkpoint: Path | str, device: str) -> tuple[nn.Module, dict[str, Any]]:
    return _model(str(checkpoint), Path(checkpoint).stat().st_mtime_ns, device)


def run_job(job: Job) -> str:
    """Predict one case (or band) of `job.images` into the already laid-out store at `job.out`."""
    model, meta = cached_model(job.checkpoint, job.device)
    images, out = CaseStore(job.images), CaseStore(job.out, mode="r+")
    if job.rows is None:
        pixels, video = np.asarray(images.image(job.case_id)), images.is_video(job.case_id)
        probs = predict_frames(model, frames_of(pixels, video), meta, job.cfg, torch.device(job.device))
        out.write_array(job.case_id, "prob", probs if video else probs[0])
    else:
        image, prob = images.image(job.case_id), out.array(job.case_id, "prob")
        predict_tiled(model, meta, image, prob, job.cfg, torch.device(job.device), job.rows, prob.chunks[-2])
    log.info("predicted %s rows %s", job.case_id, job.rows or "all")
    return job.case_id


def plan_jobs(
    checkpoint: Path, images: CaseStore, roles: dict[str, str], store: CaseStore, cfg: InferConfig, device: str
) -> list[Job]:
    """Lay out every case in `store` (attrs, role, and for tiled cases an empty banded `prob` array)
    and list the jobs that fill it: whole cases, or bands of rows of tiled images."""
    meta = store.attrs["model"]
    jobs = []
    for case_id, role in roles.items():
        attrs = images.case_attrs(case_id)
        store.write_case(case_id, {**{k: attrs[k] for k in CASE_ATTRS if k in attrs}, "role": role})
        # Absolute paths: a worker of a real cluster runs in a folder of its own, not the client's.
        job = Job(str(Path(checkpoint).absolute()), str(images.path.absolute()), str(store.path.absolute()),
                  case_id, cfg, device)
        if meta_tile_extent(meta) is None:
            jobs.append(job)
            continue
        image = images.image(case_id)
        if images.is_video(case_id) or image.ndim not in (2, 3):
            raise StoreError(f"{images.path}: case {case_id!r}: tiled inference takes 2-D images, "
                             f"got {'a video' if images.is_video(case_id) else image.shape}")
        # Bands of the image's chunk rows; an image kept as its file (decoded whole) is one band.
        height, chunk = image.shape[0], getattr(image, "chunks", image.shape)[0]
        store.create_banded(case_id, "prob", (len(meta["classes"]),) + image.shape[:2], "float16", False, chunk)
        jobs += [replace(job, rows=band) for band in row_bands(height, chunk, cfg.band_rows)]
    return jobs


def predict_store(
    checkpoint: Path,
    images: CaseStore,
    roles: dict[str, str],
    out: Path,
    cfg: InferConfig,
    device: str = "cpu",
    client: Client | None = None,
) -> None:
    """Predict the cases `roles` names ({case_id: "val" | "test"}) into a new store at `out`
    (written atomically): same case keys as `images`, each case's role in its attrs, the
    checkpoint's meta (incl. val_dice) in the store attrs as `model`. With a Dask client, the
    jobs run on its workers, each writing its own case or chunk rows straight into the store."""
    _, meta = cached_model(checkpoint, "cpu")
    with atomic_dir(out, Owner("infer", images.attrs["dataset"])) as tmp:
        store = CaseStore.create(tmp, dataset=images.attrs["dataset"], classes=meta["classes"], model=meta)
        jobs = plan_jobs(checkpoint, images, roles, store, cfg, device)
        if client is None:
            for job in jobs:
                run_job(job)
        else:
            map_tracked(client, run_job, jobs, f"infer {Path(checkpoint).parent}", unit="job")
