"""Inference: per-class sigmoid probabilities, written to a Zarr store as float16.

Two modes, chosen by the checkpoint's meta (`tile_scale`, see DatasetConfig):
    whole-image  each frame is resized to the model's size, predicted, and the probabilities resized
                 back to the frame's size (small images, videos frame by frame).
    tiled        a sliding window over the full-resolution image, read band by band from Zarr: each
                 tile covers `tile_extent` pixels, is resized to the model's size (not at scale 1),
                 and its logits are resized back and blended (segpipe.tiling). Finished rows go to
                 the output array in whole chunk rows; no full-resolution float array is held.

Both modes normalise with whole-image statistics (per-frame z-score, as training does), so a
tile looks the same to the model whichever mode or band it is predicted in.

Test-time flips average the *logits* of the plain and flipped views, before the sigmoid: the
same space in which tiles are blended, so one rule holds throughout.

Padding: tiles are placed inside the image (MONAI's placement, segpipe.tiling), so only an axis
shorter than one tile needs any. It is mirror-padded (numpy 'reflect', the U-Net overlap-tile
strategy: the model sees plausible context, not a black frame), split before/after as MONAI
splits its padding. MONAI pads with zeros by default; with `padding_mode="reflect"` it gives
the same result as here (tests/test_infer.py checks both placements against it).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from segpipe.atomic import Owner, atomic_dir
from segpipe.config import InferConfig, tile_extent
from segpipe.errors import StoreError
from segpipe.preprocess import frames_to_input, image_channels, image_statistics, resize, to_float16
from segpipe.store import CaseStore, WritesBehind, frames_of
from segpipe.tiling import BandBlender, Grid, importance_map, row_bands
from segpipe.train import load_model

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

PROB_STEPS = 1024
CASE_ATTRS = ("group", "kind", "original_size", "fps", "warmup_frames")


class Array(Protocol):
    """What inference needs of an image or output array: a numpy array or a Zarr array."""

    shape: tuple[int, ...]

    def __getitem__(self, key: Any) -> np.ndarray: ...
    def __setitem__(self, key: Any, value: np.ndarray) -> None: ...


def meta_tile_extent(meta: dict[str, Any]) -> tuple[int, int] | None:
    """The full-resolution (h, w) one tile of this checkpoint's model covers; None for whole-image models."""
    return tile_extent(meta["image_size"], meta.get("tile_scale"))


def to_probabilities(logits: torch.Tensor) -> np.ndarray:
    """Sigmoid, rounded to 1/1024 (within float16's own step near 1): the many exact 0s and 1s
    then compress ~10x, where float16 noise in the low bits did not compress at all.

    One full-size temporary (the sigmoid), the rest in place: `logits` may be a view the model
    returned (an expanded tensor cannot be written in place), so it is never overwritten."""
    return to_float16(logits.sigmoid().mul_(PROB_STEPS).round_().div_(PROB_STEPS))


def tta_logits(model: nn.Module, x: torch.Tensor, flips: list[tuple[int, ...]]) -> torch.Tensor:
    """Mean logits of the plain view and each flipped view (flipped back)."""
    total = model(x)
    for dims in flips:
        total = total + model(x.flip(dims)).flip(dims)  # not in place: a model may return a view
    return total / (1 + len(flips)) if flips else total


@torch.inference_mode()
def predict_frames(
    model: nn.Module,
    frames: np.ndarray,
    meta: dict[str, Any],
    cfg: InferConfig,
    device: torch.device,
    channels_per_step: int = 8,
) -> np.ndarray:
    """Whole-image mode: (T, H, W[, C]) frames -> (T, K, H, W) float16 probabilities at the frames' size."""
    size = tuple(meta["image_size"])
    out = np.empty((len(frames), len(meta["classes"])) + frames.shape[1:3], dtype=np.float16)
    for start in range(0, len(frames), cfg.batch_size):
        x = resize(frames_to_input(frames[start : start + cfg.batch_size], meta["in_channels"]), size)
        logits = tta_logits(model, x.to(device), cfg.tta_flips()).cpu()
        # Back to full size a few classes at a time: 29 float32 channels at 2048^2 would be ~0.5 GB.
        for c in range(0, logits.shape[1], channels_per_step):
            full = resize(logits[:, c : c + channels_per_step], frames.shape[1:3])
            out[start : start + len(x), c : c + channels_per_step] = to_probabilities(full)
    return out


def _padded_band(image: Array, grid: Grid, y: int) -> np.ndarray:
    """Image rows of the tile row starting at padded row `y`, mirror-padded where the image is smaller than a tile."""
    (top, bottom), (left, right) = grid.pad
    band = image[max(y - top, 0) : y - top + grid.tile[0]]
    if top or bottom or left or right:
        widths = ((top, bottom), (left, right)) + ((0, 0),) * (band.ndim - 2)
        band = np.pad(band, widths, mode="reflect")
    return band


def _tiles(image: Array, grid: Grid, rows: tuple[int, int], in_channels: int, stats: tuple[float, float]
           ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(y, x, (C, h, w) normalised tile) in raster order, one band of image rows read per tile row."""
    mean, std = stats
    for y in grid.tile_rows_for(rows):
        band = (image_channels(_padded_band(image, grid, y), in_channels) - mean) / (std + 1e-6)
        for x in grid.xs:
            yield y, x, band[:, :, x : x + grid.tile[1]]


def _batches(tiles: Iterator, size: int) -> Iterator[list]:
    batch = []
    for tile in tiles:
        batch.append(tile)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
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
    """Tiled mode: probabilities of image rows [r0, r1) (default: all) of an (H, W[, C]) image into
    `out[:, r0:r1]` of a (K, H, W) float16 array, written in runs of whole `chunk` rows."""
    extent, size = meta_tile_extent(meta), tuple(meta["image_size"])
    if extent is None:
        raise ValueError("predict_tiled needs a model trained on tiles (meta tile_scale)")
    grid = Grid.of(image.shape[:2], extent, cfg.overlap)
    rows = rows or (0, image.shape[0])
    stats = image_statistics(image, meta["in_channels"], chunk)

    with WritesBehind(out) as writes:

        def emit(r0: int, r1: int, logits: torch.Tensor) -> None:
            writes.write((slice(None), slice(r0, r1)), to_probabilities(logits))

        blender = BandBlender(grid, rows, len(meta["classes"]), importance_map(extent, cfg.mode), chunk, emit)
        for batch in _batches(_tiles(image, grid, rows, meta["in_channels"], stats), cfg.batch_size):
            x = resize(torch.stack([tile for _, _, tile in batch]), size)
            logits = tta_logits(model, x.to(device), cfg.tta_flips()).cpu()
            for (y, x0, _), tile_logits in zip(batch, logits):
                # Back to full resolution one tile at a time: a batch of 29-class tiles would be large.
                blender.add(y, x0, resize(tile_logits[None], extent)[0])
        blender.close()


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
        job = Job(str(checkpoint), str(images.path), str(store.path), case_id, cfg, device)
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
            client.gather(client.map(run_job, jobs, pure=False))
