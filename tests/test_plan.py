"""The plan stage's library: exact fingerprint numbers, overrides that win, a plan that does not
wobble, and valid plans for the real samples in ../shared/data."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from segpipe import models, step_time
from segpipe.config import DaskConfig, HandXrayDemo, IngestConfig, Params, PseudolabelConfig
from segpipe.datasets import demo_hand
from segpipe.fingerprint import fingerprint
from segpipe.ingest import ingest
from segpipe.parallel import dask_client
from segpipe.plan import PRESETS, make_plan
from segpipe.plan_file import Plan
from segpipe.pseudolabel import pseudolabel_store
from segpipe.store import CaseStore
from tests.conftest import ROOT, SHARED_DATA, needs_shared_data

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def step_cache(tmp_path, monkeypatch):
    """Step times measured by these tests go to a cache of their own, not the user's."""
    monkeypatch.setenv("SEGPIPE_CACHE_DIR", str(tmp_path / "cache"))


def params(**sections) -> Params:
    """params.yaml with whole sections or keys replaced: {"train": {"epochs": 3}} updates train."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, update in sections.items():
        raw[name] = {**raw.get(name, {}), **update}
    return Params.model_validate(raw)


def box(mask: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> None:
    mask[rows[0] : rows[1], cols[0] : cols[1]] = 1


@pytest.fixture
def tiny(tmp_path):
    """Two grey images with two overlapping classes, every number known by hand:
    a: 20x30 of value 10; x: a 4x8 box and a 3x2 box; y: a 4x5 box sharing 2x3 pixels with x's first.
    b: 30x40 of value 50; x: a 10x10 box; y: nothing."""
    images = CaseStore.create(tmp_path / "i.zarr", dataset="t", classes=["x", "y"])
    labels = CaseStore.create(tmp_path / "l.zarr", dataset="t", classes=["x", "y"])
    a, b = np.zeros((2, 20, 30), np.uint8), np.zeros((2, 30, 40), np.uint8)
    box(a[0], (2, 6), (3, 11))
    box(a[0], (10, 13), (20, 22))
    box(a[1], (4, 8), (8, 13))
    box(b[0], (0, 10), (0, 10))
    for case, value, mask in (("a", 10, a), ("b", 50, b)):
        images.write_case(case, {"kind": "image", "group": case}, {"image": np.full(mask.shape[1:], value, np.uint8)})
        labels.write_case(case, {"kind": "image", "group": case}, {"mask": mask})
    return images, labels


def test_fingerprint_numbers_of_a_tiny_store(tiny):
    fp = fingerprint(*tiny, ["a", "b"])
    assert fp["cases"] == 2 and fp["labelled_frames"] == 2 and fp["video"] is None
    assert fp["images"]["height_px"] == {"p0": 20, "p5": 20.5, "p50": 25, "p95": 29.5, "p100": 30, "mean": 25}
    assert fp["images"]["distinct_sizes"] == 2 and fp["images"]["channels"] == [1]
    # 600 pixels of 10 and 1200 of 50
    assert fp["intensity"] == [{"mean": 36.667, "std": 18.856, "p0.5": 10, "p50": 50, "p99.5": 50}]
    x, y = fp["classes"]["x"], fp["classes"]["y"]
    assert x["present_fraction"] == 1 and y["present_fraction"] == 0.5
    assert x["objects_per_frame"]["p0"] == 1 and x["objects_per_frame"]["p100"] == 2
    assert x["single_object_fraction"] == 0.5 and y["single_object_fraction"] == 1
    assert (x["object_area_px"]["p0"], x["object_area_px"]["p50"], x["object_area_px"]["p100"]) == (6, 32, 100)
    assert (x["object_thinnest_px"]["p0"], x["object_thinnest_px"]["p100"]) == (2, 10)
    assert y["object_area_px"]["p50"] == 20 and y["object_thinnest_px"]["p50"] == 4
    assert x["foreground_fraction"]["p0"] == round(38 / 600, 4)
    assert x["foreground_fraction"]["p100"] == round(100 / 1200, 4)
    # 6 pixels in both classes, of 152 foreground pixels (52 in a, 100 in b)
    assert fp["overlap"] == {"shared_pixel_fraction": round(6 / 152, 4), "overlapping_pairs": 1,
                             "top_pairs": [{"classes": ["x", "y"], "pixels": 6}]}


def test_geometry_and_network_follow_the_smallest_objects(tiny):
    plan = make_plan(fingerprint(*tiny, ["a", "b"]), params(train={"epochs": 3}), "hand_xray", CPU)["plan"]
    # the thinnest objects (p5 of 2..10 px) keep min_object_px 12 only at full scale: 25 x 35 -> 32 x 48, then 64
    assert plan["tile_scale"]["value"] is None and plan["image_size"]["value"] == [64, 64]
    # levels while the deepest map keeps >= 12 px: 64, 32, 16
    assert plan["channels"]["value"] == [16, 32, 64] and plan["channels"]["source"] == "rule"
    assert plan["augment"]["value"] == PRESETS["grey"].model_dump(mode="json")
    assert (plan["hflip"]["value"], plan["vflip"]["value"]) == (True, False)
    assert plan["epochs"] == {"value": 3, "source": "override", "why": "set in params.yaml (train.epochs)"}


def test_an_explicit_param_wins_over_the_plan_and_says_where_it_is_set(tiny):
    fp = fingerprint(*tiny, ["a", "b"])
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["datasets"]["hand_xray"].update(image_size=[96, 128], tile_scale=None)
    raw["train"]["per_dataset"] = {"hand_xray": {"channels": [8, 16, 32], "epochs": 2, "loss": "tversky"}}
    raw["augment"] = {"hand_xray": {"vflip": 0.5}}
    raw["infer"]["hflip"] = False
    raw["ensemble"]["grid_step"] = 0.2
    plan = make_plan(fp, Params.model_validate(raw), "hand_xray", CPU)["plan"]
    expected = {
        "image_size": ([96, 128], "datasets.hand_xray.image_size"),
        "tile_scale": (None, "datasets.hand_xray.tile_scale"),
        "channels": ([8, 16, 32], "train.per_dataset.hand_xray.channels"),
        "loss": ("tversky", "train.per_dataset.hand_xray.loss"),
        "epochs": (2, "train.per_dataset.hand_xray.epochs"), "hflip": (False, "infer.hflip"),
        "grid_step": (0.2, "ensemble.grid_step"),
    }
    for key, (value, where) in expected.items():
        assert plan[key] == {"value": value, "source": "override", "why": f"set in params.yaml ({where})"}, key
    assert plan["augment"]["source"] == "override" and plan["augment"]["value"]["vflip"] == 0.5
    assert plan["vflip"]["value"] is True  # planned from the overriding augmentation, which flips vertically
    assert plan["res_units"]["source"] == "rule"


def test_epochs_come_from_the_budget_and_a_cached_step_time_so_replanning_gives_the_same_bytes(tiny, tmp_path):
    fp = fingerprint(*tiny, ["a", "b"])
    cfg = params(plan={"budget_minutes": {"hand_xray": 0.05}, "max_passes": {"hand_xray": 1e6}})
    first = make_plan(fp, cfg, "hand_xray", CPU)
    again = make_plan(fp, cfg, "hand_xray", CPU)
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert "measured on this device" in first["plan"]["epochs"]["why"]
    (seconds,) = json.loads(step_time.cache_path().read_text()).values()
    assert seconds == step_time.quarter_octave(seconds)  # cached rounded
    members, steps_per_epoch = len(cfg.train.folds) * len(cfg.train.archs), cfg.train.steps_per_epoch
    expected = max(1, int(0.9 * 0.05 * 60 / (members * seconds) // steps_per_epoch))
    assert first["plan"]["epochs"]["value"] == expected and first["plan"]["epochs"]["source"] == "measurement"


def test_small_data_stop_at_max_passes_not_the_budget(tiny):
    cfg = params(plan={"budget_minutes": {"hand_xray": 1000}, "max_passes": {"hand_xray": 100, "kvasir": 1e6}})
    epochs = make_plan(fingerprint(*tiny, ["a", "b"]), cfg, "hand_xray", CPU)["plan"]["epochs"]
    # 2 frames, 3 folds: a fold trains on round(2 * 2 / 3) = 1 sample; 100 passes of batch 8 -> 12.5 steps
    assert epochs["source"] == "rule" and epochs["value"] == 1
    assert "max_passes 100 over 1 training samples" in epochs["why"]


def test_quarter_octaves_round_up_and_absorb_small_noise():
    assert step_time.quarter_octave(0.5) == 0.5
    assert step_time.quarter_octave(0.51) == step_time.quarter_octave(0.58) == round(2 ** -0.75, 9)
    for k in range(-50, 10):  # a cached value read back stays in its quarter octave
        rounded = step_time.quarter_octave(2 ** (k / 4))
        assert step_time.quarter_octave(rounded) == rounded


def test_a_plan_file_is_read_back_into_the_configs_of_the_stages(tiny, tmp_path):
    cfg = params(train={"epochs": 4})
    plan = make_plan(fingerprint(*tiny, ["a", "b"]), cfg, "hand_xray", CPU)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    read = Plan(tmp_path / "plan.json")
    train = read.train_config(cfg.train)
    assert (train.epochs, train.channels, train.res_units) == (4, (16, 32, 64), 1)
    assert read.dataset_config(cfg.dataset("hand_xray")).image_size == (64, 64)
    assert read.infer_config(cfg.infer).hflip is True and read.augment().clahe == 0.3
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(Exception, match="bad.json: not a plan written by the plan stage"):
        Plan(tmp_path / "bad.json")


def assert_runs(plan: dict, in_channels: int, classes: int) -> None:
    """The planned network accepts the planned input and gives a logit per class and pixel."""
    values = {key: item["value"] for key, item in plan["plan"].items()}
    models.check_input_size("unet", tuple(values["channels"]), tuple(values["image_size"]))
    net = models.build("unet", in_channels, classes, tuple(values["channels"]), res_units=values["res_units"])
    with torch.no_grad():
        out = net(torch.zeros(1, in_channels, *values["image_size"]))
    assert out.shape == (1, classes, *values["image_size"])


@pytest.fixture(scope="module")
def client():
    with dask_client(DaskConfig(n_workers=1, threads_per_worker=2)) as client:
        yield client


@needs_shared_data
def test_real_kvasir_plan_sees_133_sizes_and_plans_whole_colour_images(tmp_path, client):
    ingest("kvasir", SHARED_DATA / "kvasir-seg", tmp_path / "k.zarr", IngestConfig(), client)
    store = CaseStore(tmp_path / "k.zarr")
    fp = fingerprint(store, store, store.case_ids())
    assert fp["cases"] == 300 and fp["images"]["distinct_sizes"] == 133 and fp["images"]["channels"] == [3]
    assert fp["images"]["width_px"]["p0"] == 370 and fp["images"]["width_px"]["p100"] == 1348
    assert fp["classes"]["polyp"]["present_fraction"] == 1
    plan = make_plan(fp, params(train={"epochs": 5}), "kvasir", CPU)
    values = {key: item["value"] for key, item in plan["plan"].items()}
    assert values["tile_scale"] is None and all(64 <= s <= 192 and s % 16 == 0 for s in values["image_size"])
    assert values["hflip"] and values["vflip"] and values["augment"]["color_jitter"] > 0
    # the endoscope's black inset at the lower left is common in Kvasir-SEG: the preset learns it
    assert fp["images"]["dark_lower_left_fraction"] >= 0.05 and values["augment"]["black_corner"] == 0.3
    assert_runs(plan, 3, 1)


@needs_shared_data
def test_real_rtmri_plans_see_both_frame_rates_and_the_saturated_warmup(tmp_path, client):
    raw = tmp_path / "raw"
    shutil.copytree(SHARED_DATA / "usc-timit" / "F2", raw / "F2")
    shutil.copytree(SHARED_DATA / "usc-75-speaker" / "sub001", raw / "sub001")
    ingest("usc_timit", raw, tmp_path / "u.zarr", IngestConfig(), client)
    images = CaseStore(tmp_path / "u.zarr")
    labels = pseudolabel_store(images, tmp_path / "l.zarr", PseudolabelConfig())
    fp = fingerprint(images, labels, images.case_ids())
    assert fp["video"]["videos"] == 2 and fp["video"]["fps"] == [23.18, 83.28]
    assert (fp["images"]["height_px"]["p0"], fp["images"]["height_px"]["p100"]) == (68, 84)
    assert fp["video"]["frames"]["p0"] == 69 and fp["video"]["frames"]["p100"] == 3216
    assert fp["video"]["warmup_frames"]["p0"] == 0 and fp["video"]["warmup_frames"]["p100"] >= 20
    plan = make_plan(fp, params(train={"epochs": 5}), "usc_timit", CPU)
    values = {key: item["value"] for key, item in plan["plan"].items()}
    assert values["tile_scale"] is None and values["augment"] == PRESETS["video"].model_dump(mode="json")
    assert not values["hflip"] and not values["vflip"]  # the vocal tract always faces one way
    assert_runs(plan, 1, 1)


@needs_shared_data
def test_real_hand_xray_of_1514x2044_is_planned_in_tiles(tmp_path):
    """The real RSNA X-ray has no masks: the demo's 29 bones, drawn at 2048 px, are resized onto it."""
    demo_hand.write(tmp_path / "demo", HandXrayDemo(n_patients=2, n_test_patients=0, size=2048), seed=0)
    from PIL import Image

    xray = np.asarray(Image.open(SHARED_DATA / "hand-xray-rsna" / "1377.png"))
    assert xray.shape == (2044, 1514)
    demo = tmp_path / "demo.zarr"
    with dask_client(DaskConfig(n_workers=1, threads_per_worker=1)) as client:
        ingest("hand_xray", tmp_path / "demo" / "hand_xray", demo, IngestConfig(), client)
    source = CaseStore(demo)
    case = source.case_ids()[0]
    masks = torch.from_numpy(source.read(case, "mask")[None]).float()
    masks = (torch.nn.functional.interpolate(masks, size=xray.shape, mode="nearest")[0] > 0).numpy().astype(np.uint8)
    images = CaseStore.create(tmp_path / "r.zarr", dataset="hand_xray", classes=source.classes)
    labels = CaseStore.create(tmp_path / "rl.zarr", dataset="hand_xray", classes=source.classes)
    images.write_case("1377", {"kind": "image", "group": "1377"}, {"image": xray})
    labels.write_case("1377", {"kind": "image", "group": "1377"}, {"mask": masks})
    fp = fingerprint(images, labels, ["1377"])
    assert (fp["images"]["height_px"]["p50"], fp["images"]["width_px"]["p50"]) == (2044, 1514)
    plan = make_plan(fp, params(train={"epochs": 5}), "hand_xray", CPU)
    values = {key: item["value"] for key, item in plan["plan"].items()}
    # the scale the smallest bones need, in steps of 1/32; a third of the crops centred on a bone
    assert 0 < values["tile_scale"] < 1 and (values["tile_scale"] * 32).is_integer()
    assert values["foreground_fraction"] == 0.33
    assert all(s <= 2044 * values["tile_scale"] for s in values["image_size"])  # a tile fits inside the image
    assert fp["overlap"]["overlapping_pairs"] > 0 and len(fp["classes"]) == 29
    assert_runs(plan, 1, 29)
