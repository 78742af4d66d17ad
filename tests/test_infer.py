import shutil

import numpy as np
import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from torch import nn

from segpipe.config import DaskConfig, DatasetConfig, HandXrayDemo, IngestConfig, InferConfig, TrainConfig
from segpipe.data import training_set, validation_batches
from segpipe.datasets import demo_hand
from segpipe.infer import predict_store, predict_tiled
from segpipe.infer_core import predict_frames, to_probabilities
from segpipe.ingest import ingest
from segpipe.parallel import dask_client
from segpipe.preprocess import frames_to_input
from segpipe.store import CaseStore, WritesBehind
from segpipe.tiling import window_starts
from segpipe.train import fit, new_model, save_checkpoint
from tests.conftest import SHARED_DATA, needs_shared_data

CPU = torch.device("cpu")
CFG = InferConfig(overlap=0.25, mode="gaussian", batch_size=3)


class FirstChannelLogit(nn.Module):
    """A 'model' whose logits are its (z-scored) input repeated per class: lets tests predict by hand."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        return x[:, :1].repeat(1, self.classes, 1, 1)


class ColumnRamp(nn.Module):
    """Logits that depend on where a pixel sits in the tile, not on the image: -1 at the left edge, +1 at the right."""

    def forward(self, x):
        return torch.linspace(-1, 1, x.shape[-1]).expand(x.shape[0], 1, *x.shape[-2:])


def unet_meta(classes: int, tile_scale: float | None, size: int = 32) -> dict:
    return {"arch": "unet", "classes": [f"c{i}" for i in range(classes)], "in_channels": 1,
            "image_size": [size, size], "channels": [8, 16], "tile_scale": tile_scale}


def tiled(model, meta, image, cfg=CFG, **kw) -> np.ndarray:
    out = np.full((len(meta["classes"]),) + image.shape[:2], np.nan, np.float16)
    predict_tiled(model, meta, image, out, cfg, CPU, **kw)
    return out


@pytest.mark.parametrize("length,tile,overlap", [(64, 64, 0.25), (100, 32, 0.25), (129, 64, 0.5), (1000, 96, 0.4)])
def test_tiles_are_placed_where_monai_places_them(length, tile, overlap):
    interval = _get_scan_interval((length,), (tile,), 1, (overlap,))
    assert window_starts(length, tile, overlap) == [s[0].start for s in dense_patch_slices((length,), (tile,), interval)]


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("shape", [(150, 230), (40, 100)])  # not multiples of tile or chunk; the second shorter than a tile
def test_tiled_zarr_inference_equals_monai_sliding_window(tmp_path, mode, shape):
    meta = unet_meta(2, tile_scale=1.0)
    model = new_model(meta, 0).eval()
    image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    store = CaseStore.create(tmp_path / "images.zarr", dataset="t", classes=meta["classes"])
    store.write_case("c", {"kind": "image"})
    zimage = store.write_array("c", "image", image, chunk=48)
    cfg = InferConfig(overlap=0.25, mode=mode, batch_size=3)
    ours = tiled(model, meta, zimage, cfg, chunk=48)
    with torch.no_grad():  # MONAI pads with zeros by default; we mirror, which it also offers
        logits = sliding_window_inference(frames_to_input(image[None], 1), (32, 32), 3, model, overlap=0.25,
                                          mode=mode, padding_mode="reflect")
    assert np.abs(ours.astype(np.float32) - torch.sigmoid(logits)[0].numpy()).max() < 1e-3


@pytest.mark.parametrize("classes", [1, 29])
def test_one_and_twenty_nine_class_models_predict_every_pixel_at_half_scale(classes):
    meta = unet_meta(classes, tile_scale=0.5)  # 32 px model tiles cover 64 px of the image
    image = np.random.default_rng(1).integers(0, 255, (150, 97), dtype=np.uint8)
    probs = tiled(new_model(meta, 0).eval(), meta, image, chunk=32)
    assert probs.shape == (classes, 150, 97)
    assert not np.isnan(probs).any() and 0 <= probs.min() and probs.max() <= 1


def test_bands_of_rows_predicted_apart_equal_one_pass():
    meta = unet_meta(3, tile_scale=0.5)
    model = new_model(meta, 0).eval()
    image = np.random.default_rng(2).integers(0, 255, (200, 90), dtype=np.uint8)
    whole = tiled(model, meta, image, chunk=16)
    parts = np.full_like(whole, np.nan)
    for rows in [(0, 48), (48, 160), (160, 200)]:
        predict_tiled(model, meta, image, parts, CFG, CPU, rows=rows, chunk=16)
    assert np.array_equal(whole, parts)


def test_flip_tta_of_a_flip_symmetric_model_returns_its_own_probabilities():
    meta = unet_meta(2, tile_scale=1.0)
    image = np.random.default_rng(3).integers(0, 255, (70, 90), dtype=np.uint8)
    cfg = InferConfig(overlap=0.5, batch_size=4, hflip=True, vflip=True)
    probs = tiled(FirstChannelLogit(2), meta, image, cfg)
    expected = to_probabilities(frames_to_input(image[None], 1)[0, 0])
    assert np.abs(probs.astype(np.float32) - expected).max() <= 1 / 1024


def test_hflip_tta_averages_each_view_flipped_back():
    meta = unet_meta(1, tile_scale=None, size=16)
    frames = np.zeros((1, 16, 16), np.uint8)
    plain = predict_frames(ColumnRamp(), frames, meta, InferConfig(), CPU)
    flipped = predict_frames(ColumnRamp(), frames, meta, InferConfig(hflip=True), CPU)
    assert plain[0, 0, 0, 0] < 0.3 and plain[0, 0, 0, -1] > 0.7
    # The ramp and its mirror image cancel: every logit 0, every probability 1/2.
    assert np.all(flipped == 0.5)


def test_whole_image_mode_resizes_probabilities_back_to_each_frame():
    meta = {"classes": ["a", "b", "c"], "in_channels": 1, "image_size": [32, 32]}
    frames = np.random.default_rng(0).integers(0, 255, (3, 50, 70), dtype=np.uint8)
    probs = predict_frames(FirstChannelLogit(3), frames, meta, CFG, CPU)
    assert probs.shape == (3, 3, 50, 70) and probs.dtype == np.float16
    assert 0 <= probs.min() and probs.max() <= 1
    assert np.array_equal(probs[:, 0], probs[:, 2])  # the per-class loop must not mix channels up


def _checkpoint(tmp_path, meta, val_dice=0.5):
    path = tmp_path / "best.pt"
    save_checkpoint(path, new_model(meta, 0), {**meta, "val_dice": val_dice})
    return path


def test_prediction_store_holds_val_and_test_cases_with_roles_and_model_meta(disc_stores, tmp_path):
    images, _ = disc_stores
    meta = unet_meta(1, tile_scale=None)
    cases = images.case_ids()
    roles = {cases[0]: "val", cases[1]: "val", cases[5]: "test"}
    predict_store(_checkpoint(tmp_path, meta), images, roles, tmp_path / "pred.zarr", CFG)
    pred = CaseStore(tmp_path / "pred.zarr")
    assert pred.case_ids() == sorted(roles)
    assert {c: pred.case_attrs(c)["role"] for c in roles} == roles
    assert pred.array(cases[0], "prob").shape == (1, 48, 48)
    assert pred.case_attrs(cases[0])["group"] == images.case_attrs(cases[0])["group"]
    assert pred.attrs["model"]["val_dice"] == 0.5


@pytest.fixture(scope="module")
def client():
    with dask_client(DaskConfig(n_workers=1, threads_per_worker=2)) as client:
        yield client


def test_dask_workers_writing_bands_of_chunk_rows_match_one_pass(tmp_path, client):
    meta = unet_meta(2, tile_scale=0.5)
    image = np.random.default_rng(4).integers(0, 255, (300, 130), dtype=np.uint8)
    images = CaseStore.create(tmp_path / "images.zarr", dataset="t", classes=meta["classes"])
    images.write_case("big", {"kind": "image"})
    images.write_array("big", "image", image, chunk=32)
    cfg = InferConfig(batch_size=4, band_rows=64)  # five bands, two or three rows of tiles each
    predict_store(_checkpoint(tmp_path, meta), images, {"big": "test"}, tmp_path / "pred.zarr", cfg, "cpu", client)
    prob = CaseStore(tmp_path / "pred.zarr").array("big", "prob")
    # The image's 32-px tiles split 300 x 130 evenly (30 x 26); a shard per band of 30 rows, full width.
    assert prob.dtype == np.float16 and prob.shards == (2, 30, 130)
    assert np.array_equal(prob[:], tiled(new_model(meta, 0).eval(), meta, image, cfg, chunk=32))


@needs_shared_data
def test_real_hand_xray_is_ingested_and_predicted_tile_by_tile(tmp_path, client):
    demo_hand.write(tmp_path / "demo", HandXrayDemo(n_patients=2, n_test_patients=0, size=256), seed=0)
    ingest("hand_xray", tmp_path / "demo" / "hand_xray", tmp_path / "demo.zarr", IngestConfig(chunk=128), client)
    demo = CaseStore(tmp_path / "demo.zarr")
    data = DatasetConfig(raw=tmp_path / "demo", in_channels=1, image_size=(64, 64), tile_scale=0.25)
    meta = {**unet_meta(29, tile_scale=0.25), "image_size": [64, 64]}  # a 64 px tile covers 256 px
    cases = demo.case_ids()
    train = training_set(demo, demo, cases, data, foreground_fraction=0.5)
    cfg = TrainConfig(archs=("unet",), folds=(0,), epochs=1, steps_per_epoch=3, batch_size=2, lr=3e-3,
                      patience=1, channels=(8, 16))
    (tmp_path / "model").mkdir()
    val = validation_batches(demo, demo, cases[:1], data, 2)
    fit(new_model(meta, 0), train, val, cfg, tmp_path / "model", CPU, meta)

    raw = tmp_path / "rsna" / "test" / "DCM" / "ID900"
    raw.mkdir(parents=True)
    shutil.copy(SHARED_DATA / "hand-xray-rsna" / "1377.png", raw / "image1661000001377_R.png")
    ingest("hand_xray", tmp_path / "rsna", tmp_path / "rsna.zarr", IngestConfig(chunk=512), client)
    images = CaseStore(tmp_path / "rsna.zarr")
    (case,) = images.case_ids()
    predict_store(tmp_path / "model" / "best.pt", images, {case: "test"}, tmp_path / "pred.zarr",
                  InferConfig(batch_size=8), "cpu", client)
    prob = CaseStore(tmp_path / "pred.zarr").array(case, "prob")
    assert prob.shape == (29, 2044, 1514) and prob.dtype == np.float16  # (classes, H, W) of a 1514 x 2044 PNG
    for c in (0, 28):
        channel = prob[c].astype(np.float32)
        assert 0 <= channel.min() and channel.max() <= 1


def test_writes_behind_land_in_zarr_and_a_failed_write_is_raised(tmp_path):
    store = CaseStore.create(tmp_path / "p.zarr", dataset="t", classes=["a", "b"])
    store.write_case("c", {"kind": "image"})
    out = store.create_banded("c", "prob", (2, 64, 40), "float16", False, 16)
    bands = np.random.default_rng(0).random((2, 64, 40)).astype(np.float16)
    with WritesBehind(out) as writes:
        for r in range(0, 64, 16):
            writes.write((slice(None), slice(r, r + 16)), bands[:, r : r + 16])
    assert np.array_equal(store.array("c", "prob")[:], bands)
    with pytest.raises((ValueError, IndexError), match="8"), WritesBehind(out) as writes:
        writes.write((slice(None), slice(0, 16)), bands[:, :8])  # 8 rows into 16: zarr's own error
