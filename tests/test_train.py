import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from zarr.storage import LocalStore, LoggingStore

from segpipe.config import DatasetConfig, Params, TrainConfig
from segpipe import losses
from segpipe.data import TileCrops, TrainingSet, load_samples, training_set, validation_batches
from segpipe.errors import ConfigError, StoreError
from segpipe.fingerprint import fingerprint
from segpipe.plan import make_plan
from segpipe.preprocess import frames_to_input, masks_to_target, resize
from segpipe.splits import make_split
from segpipe.store import CaseStore
from segpipe.train import fit, folder_digest, load_model, new_model, next_batches
from tests.conftest import ROOT

CFG = TrainConfig(
    archs=("unet",), folds=(0,), epochs=25, steps_per_epoch=2, batch_size=4, lr=0.01, patience=25, channels=(8, 16, 32), seed=0
)
META = {"arch": "unet", "classes": ["disc"], "in_channels": 1, "image_size": [32, 32], "channels": [8, 16, 32]}
DISCS = DatasetConfig(raw="unused", in_channels=1, image_size=(32, 32))
CPU = torch.device("cpu")


class Recorder:
    """A metric logger that keeps what the loop logs, per step."""

    def __init__(self):
        self.step, self.rows = 0, []

    def log_metric(self, name, val):
        if len(self.rows) <= self.step:
            self.rows.append({})
        self.rows[self.step][name] = val

    def next_step(self):
        self.step += 1


def _out(tmp_path: Path) -> Path:
    out = tmp_path / "model"
    out.mkdir()
    return out


def _data(disc_stores, data=DISCS):
    images, labels = disc_stores
    cases = images.case_ids()
    return training_set(images, labels, cases[:8], data, 0.33), validation_batches(images, labels, cases[8:], data, 4)


def test_training_learns_discs_and_best_checkpoint_holds_the_best_epoch(disc_stores, tmp_path):
    train, val = _data(disc_stores)
    x, y, w = train.batch(torch.arange(8), torch.Generator())
    assert x.shape == (8, 1, 32, 32) and y.shape == (8, 1, 32, 32) and w is None
    out = _out(tmp_path)
    result = fit(new_model(META, 0), train, val, CFG, out, CPU, META)
    assert result.best_dice > 0.8
    best, meta = load_model(out / "best.pt", CPU)
    assert meta["epoch"] == result.best_epoch and meta["val_dice"] == result.best_dice
    assert {p.name for p in out.iterdir()} == {"best.pt", "last.pt", "top"}


def test_early_stopping_stops_patience_epochs_after_the_best(disc_stores, tmp_path):
    train, val = _data(disc_stores)
    cfg = CFG.model_copy(update={"epochs": 40, "patience": 2, "lr": 0.05})
    out = _out(tmp_path)
    result = fit(new_model(META, 0), train, val, cfg, out, CPU, META)
    assert result.stopped_early
    assert result.epochs_run == result.best_epoch + cfg.patience + 1
    assert torch.load(out / "best.pt")["meta"]["epoch"] == result.best_epoch


def test_top_k_keeps_exactly_the_k_best_epochs(disc_stores, tmp_path):
    train, val = _data(disc_stores)
    cfg = CFG.model_copy(update={"epochs": 8, "top_k": 3})
    tracker, out = Recorder(), _out(tmp_path)
    fit(new_model(META, 0), train, val, cfg, out, CPU, META, tracker=tracker)
    dice = [row["val/dice"] for row in tracker.rows]
    best3 = sorted(range(len(dice)), key=lambda e: (-dice[e], e))[:3]
    assert sorted(p.name for p in (out / "top").iterdir()) == sorted(f"epoch{e:03d}.pt" for e in best3)
    for e in best3:
        assert torch.load(out / "top" / f"epoch{e:03d}.pt")["meta"]["val_dice"] == dice[e]
    assert torch.load(out / "best.pt")["meta"]["epoch"] == best3[0]


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_schedules_give_the_expected_learning_rate_per_epoch(disc_stores, tmp_path, schedule):
    train, val = _data(disc_stores)
    cfg = CFG.model_copy(update={"epochs": 5, "steps_per_epoch": 1, "schedule": schedule, "poly_power": 0.9})
    tracker = Recorder()
    fit(new_model(META, 0), train, val, cfg, _out(tmp_path), CPU, META, tracker=tracker)
    expected = {
        "poly": lambda e: cfg.lr * (1 - e / cfg.epochs) ** cfg.poly_power,
        "cosine": lambda e: cfg.lr * (1 + math.cos(math.pi * e / cfg.epochs)) / 2,
    }[schedule]
    assert [row["train/lr"] for row in tracker.rows] == pytest.approx([expected(e) for e in range(5)], rel=1e-6)


def test_same_seed_gives_bitwise_identical_weights_on_cpu(disc_stores, tmp_path):
    train, val = _data(disc_stores)
    cfg = CFG.model_copy(update={"epochs": 2})
    weights = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        torch.rand(ord(run))  # different global RNG state before each run must not matter
        fit(new_model(META, cfg.seed), train, val, cfg, tmp_path / run, CPU, META)
        weights.append(torch.load(tmp_path / run / "last.pt")["state_dict"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_batches_visit_every_sample_equally_often_across_steps():
    seen = torch.cat(list(next_batches(10, 4, steps=5, generator=torch.Generator().manual_seed(0))))
    assert len(seen) == 20 and torch.bincount(seen, minlength=10).tolist() == [2] * 10



def test_whole_frames_are_the_kept_frames_of_each_case_normalised_and_resized(tmp_path):
    rng = np.random.default_rng(2)
    images = CaseStore.create(tmp_path / "v.zarr", dataset="v", classes=["a", "b"])
    labels = CaseStore.create(tmp_path / "v_labels.zarr", dataset="v", classes=["a", "b"])
    videos = {c: (rng.integers(0, 255, (5, 40, 50), dtype=np.uint8), rng.integers(0, 2, (5, 2, 40, 50), dtype=np.uint8))
              for c in ("v0", "v1", "v2")}
    for case_id, (frames, masks) in videos.items():
        for store in (images, labels):
            store.write_case(case_id, {"kind": "video"})
        images.write_array(case_id, "image", frames)
        labels.write_array(case_id, "mask", masks)
    labels.write_array("v1", "keep", np.array([0, 1, 0, 0, 1], np.uint8))  # pseudo-labels: frames 1 and 4 trusted
    labels.write_array("v2", "keep", np.zeros(5, np.uint8))  # none trusted: the case adds nothing
    data = DatasetConfig(raw="unused", in_channels=1, image_size=(32, 32))
    x, y = load_samples(images, labels, ["v0", "v1", "v2"], data.image_size, data.in_channels)
    frames = np.concatenate([videos["v0"][0], videos["v1"][0][[1, 4]]])
    masks = np.concatenate([videos["v0"][1], videos["v1"][1][[1, 4]]])
    assert torch.equal(x, resize(frames_to_input(frames, 1), (32, 32)))
    assert torch.equal(y, masks_to_target(masks, (32, 32)).to(torch.uint8))
    with pytest.raises(StoreError, match=r"v\.zarr: case 'v0' has no 'mask' array"):
        load_samples(images, images, ["v0"], data.image_size, data.in_channels)
    with pytest.raises(StoreError, match="no case 'v9'"):
        load_samples(images, labels, ["v0", "v9"], data.image_size, data.in_channels)


def test_a_batch_of_whole_frames_is_the_indexed_samples_with_their_weight_maps(disc_stores):
    train, _ = _data(disc_stores)
    idx = torch.tensor([3, 0, 3, 7])
    weight_map = losses.build("unet_weighted").weight_map
    x, y, w = train.batch(idx, torch.Generator(), weight_map)
    assert torch.equal(x, torch.stack([train.source.x[i] for i in idx]))
    assert torch.equal(y, torch.stack([train.source.y[i] for i in idx]).float())
    assert torch.equal(w, torch.stack([torch.from_numpy(weight_map(train.source.y[i].numpy())) for i in idx]))

# --- tiled training: random crops of large images, read from Zarr ---------------------------------------

PYTHON_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"  # zarr's default
TILES = DatasetConfig(raw="unused", in_channels=1, image_size=(32, 32), tile_scale=0.25)  # crops of 128 x 128


def _sparse_store(tmp_path: Path, size: int = 512) -> tuple[CaseStore, CaseStore]:
    """Two large noisy images in 64-px chunks, each with one small labelled blob in a random place."""
    rng = np.random.default_rng(1)
    images = CaseStore.create(tmp_path / "big.zarr", dataset="big", classes=["a", "b"])
    labels = CaseStore.create(tmp_path / "big_labels.zarr", dataset="big", classes=["a", "b"])
    for i in range(2):
        mask = np.zeros((2, size, size), dtype=np.uint8)
        y, x = rng.integers(0, size - 12, 2)
        mask[i, y : y + 12, x : x + 12] = 1  # ~0.05% of the image, in a different class per case
        image = rng.integers(0, 200, (size, size), dtype=np.uint8)
        for store in (images, labels):
            store.write_case(f"c{i}", {"group": f"g{i}", "kind": "image"})
        images.write_array(f"c{i}", "image", image, chunk=64)
        labels.write_array(f"c{i}", "mask", mask, chunk=64)
    return images, labels


def test_a_crop_is_the_slice_of_the_normalised_image_and_padded_past_its_edges(tmp_path):
    images, labels = _sparse_store(tmp_path)
    crops = TileCrops(images, labels, ["c0"], TILES, 0.33)
    case = crops.cases[0]
    full = frames_to_input(images.array("c0", "image")[:][None], 1)[0]
    scaled = masks_to_target(labels.array("c0", "mask")[:][None], (128, 128))[0]  # as validation and inference see them
    x, y = crops.read(case, 50, 75)  # at tile_scale 0.25: full-resolution corner (200, 300)
    assert torch.allclose(x, full[:, 200:328, 300:428], atol=1e-4)
    assert torch.equal(y.float(), scaled[:, 50:82, 75:107])
    x, y = crops.read(case, -7, 112)  # past the top and right edges: zeros (the image's mean) there
    assert torch.allclose(x[:, 28:, :64], full[:, :100, 448:], atol=1e-4)
    assert torch.count_nonzero(x[:, :28]) == 0 and torch.count_nonzero(x[:, :, 64:]) == 0
    assert torch.equal(y[:, 7:, :16].float(), scaled[:, :25, 112:]) and torch.count_nonzero(y[:, :7]) == 0


@pytest.mark.parametrize(("corner", "chunks"), [((32, 48), 4), ((25, 25), 9)])
def test_a_crop_reads_only_the_chunks_it_covers(tmp_path, caplog, corner, chunks):
    images, labels = _sparse_store(tmp_path)
    crops = TileCrops(images, labels, ["c0"], TILES, 0.33)
    # The same store, seen through zarr's LoggingStore, which logs every call to the files (through
    # zarr's own codec pipeline: zarrs reads the files itself, where no store sees it).
    images.root = zarr.open_group(LoggingStore(LocalStore(images.path, read_only=True), log_level="INFO"), mode="r")
    caplog.clear()
    with caplog.at_level(logging.INFO), zarr.config.set({"codec_pipeline.path": PYTHON_PIPELINE}):
        crops.read(crops.cases[0], *corner)
    shard_reads = [m for m in caplog.messages if m.strip().startswith("Calling LocalStore.get(c0/image/c/")]
    # One read of the shard's index, then one per 64-px chunk the 128-px crop covers, of 64 in the shard;
    # the masks come from the cache at tile_scale.
    assert len(shard_reads) == 1 + chunks


def test_foreground_oversampling_gives_at_least_the_fraction_on_a_sparse_mask(tmp_path):
    images, labels = _sparse_store(tmp_path)
    generator = torch.Generator().manual_seed(0)
    shares = {}
    for fraction in (0.0, 0.33):
        crops = TrainingSet(TileCrops(images, labels, ["c0", "c1"], TILES, fraction))
        hits = 0
        for _ in range(25):
            _, y, _ = crops.batch(torch.tensor([0, 1, 0, 1]), generator)
            hits += int((y.flatten(1).amax(dim=1) > 0).sum())
        shares[fraction] = hits / 100
    assert shares[0.33] >= 0.33
    assert shares[0.0] < 0.2  # without oversampling, crops rarely meet such a small blob


def test_tiled_training_validates_whole_images_at_the_tile_scale(tmp_path):
    images, labels = _sparse_store(tmp_path)
    val = validation_batches(images, labels, ["c1"], TILES, 4)
    assert [tuple(x.shape) for x, _ in val] == [(1, 1, 128, 128)] and val[0][1].shape == (1, 2, 128, 128)
    train = training_set(images, labels, ["c0"], TILES, 0.5)
    meta = {**META, "classes": ["a", "b"], "tile_scale": 0.25}
    cfg = CFG.model_copy(update={"epochs": 2, "batch_size": 2})
    (tmp_path / "model").mkdir()
    result = fit(new_model(meta, 0), train, val, cfg, tmp_path / "model", CPU, meta)
    assert 0 <= result.best_dice <= 1 and load_model(tmp_path / "model" / "best.pt", CPU)[1]["tile_scale"] == 0.25


# --- kill and resume: a real `python -m tasks.train`, SIGKILLed after a checkpoint ------------------------

EPOCHS = 30  # ~2 s on one thread: time to kill the run after its epoch 2


def _stage_inputs(disc_stores, tmp_path: Path) -> list[str]:
    images, labels = disc_stores
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"]["kvasir"].update({"in_channels": 1, "image_size": [32, 32]})
    params["train"].update({"epochs": EPOCHS, "steps_per_epoch": 3, "batch_size": 4, "patience": EPOCHS, "top_k": 2,
                            "channels": [8, 16, 32], "per_dataset": {}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    groups = {c: images.case_attrs(c)["group"] for c in images.case_ids()}
    split = make_split(groups, k=params["split"]["k"], seed=0, test_fraction=0.2)
    (tmp_path / "split.json").write_text(json.dumps(split.to_json()))
    cases = sorted(c for fold in split.folds for c in fold.val)  # what the plan stage fingerprints
    plan = make_plan(fingerprint(images, labels, cases), Params.model_validate(params), "kvasir", CPU)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    return ["--dataset", "kvasir", "--arch", "unet", "--fold", "0", "--params", str(tmp_path / "params.yaml"),
            "--images", str(images.path), "--labels", str(labels.path), "--split", str(tmp_path / "split.json"),
            "--plan", str(tmp_path / "plan.json")]


def _train(args: list[str], out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tasks.train", *args, "--out", str(out), "--metrics", str(out.with_suffix(".live"))],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finished_epoch(work: Path) -> int:
    try:
        return torch.load(work / "last.pt", weights_only=True)["meta"]["epoch"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


@pytest.mark.slow
def test_a_killed_run_rerun_resumes_by_itself_and_ends_with_the_bytes_of_an_uninterrupted_run(disc_stores, tmp_path):
    args = _stage_inputs(disc_stores, tmp_path)
    whole, killed = _train(args, tmp_path / "whole"), _train(args, tmp_path / "killed")
    work = tmp_path / ".killed.partial.tmp"
    while _finished_epoch(work) < 2:
        assert killed.poll() is None, f"finished before it could be killed:\n{killed.communicate()}"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    stopped_at = _finished_epoch(work)
    assert stopped_at < EPOCHS - 1 and not (tmp_path / "killed").exists()

    shutil.rmtree(tmp_path / "killed.live")  # as DVC deletes a stage's metrics before it reruns it
    resumed = _train(args, tmp_path / "killed")  # no flag: resuming is the default
    assert resumed.wait() == 0 and whole.wait() == 0, resumed.communicate()[1][-2000:]
    assert f"resumed after epoch {stopped_at}" in resumed.communicate()[0]
    assert _files(tmp_path / "whole") == _files(tmp_path / "killed")  # every checkpoint, byte for byte
    # DVCLive's metrics.json and plots: the resumed run replayed the killed run's epochs into them.
    live = _files(tmp_path / "whole.live")
    assert live == _files(tmp_path / "killed.live")
    assert json.loads(live["metrics.json"])["step"] == EPOCHS - 1
    assert live["plots/metrics/val/dice.tsv"].count(b"\n") == 1 + EPOCHS  # header, then one row per epoch
    assert not work.exists()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Killed(Exception):
    """Stands for a kill in the middle of an epoch."""


def test_with_ema_the_kept_checkpoint_is_the_moving_average_of_the_weights_after_each_step(disc_stores, tmp_path):
    train, val = _data(disc_stores)
    cfg = CFG.model_copy(update={"epochs": 1, "steps_per_epoch": 4, "ema_decay": 0.7})
    model, snapshots = new_model(META, 0), []
    out = _out(tmp_path)
    fit(model, train, val, cfg, out, CPU, META, progress=lambda done, total: snapshots.append(
        {k: v.clone() for k, v in model.state_dict().items()}))
    expected = dict(snapshots[0])  # the first update copies the weights, then each step moves 30% of the way
    for weights in snapshots[1:]:
        expected = {k: 0.7 * expected[k] + 0.3 * weights[k] for k in expected}
    kept, last = (torch.load(out / name, weights_only=True)["state_dict"] for name in ("best.pt", "last.pt"))
    assert kept.keys() == expected.keys()
    assert all(torch.allclose(kept[k], expected[k], rtol=1e-5, atol=1e-7) for k in kept)
    assert all(torch.equal(last[k], snapshots[-1][k]) for k in last)  # training goes on from the trained weights
    assert not all(torch.equal(kept[k], last[k]) for k in kept)


def _kill_at(step: int):
    def progress(done, total):
        if done == step:
            raise Killed

    return progress


def _state_dicts_equal(a: Path, b: Path) -> bool:
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_a_run_killed_mid_epoch_resumes_automatically_and_replays_its_metrics(disc_stores, tmp_path, ema_decay):
    train, val = _data(disc_stores)
    cfg = CFG.model_copy(update={"epochs": 4, "top_k": 2, "ema_decay": ema_decay})
    inputs = {"images": "sha-a", "code": "sha-c"}
    whole, killed, resumed = Recorder(), Recorder(), Recorder()
    (tmp_path / "whole").mkdir()
    fit(new_model(META, 0), train, val, cfg, tmp_path / "whole", CPU, META, tracker=whole, inputs=inputs)
    out = _out(tmp_path)
    with pytest.raises(Killed):  # in epoch 2, after 2 finished epochs of 2 steps
        fit(new_model(META, 0), train, val, cfg, out, CPU, META, tracker=killed, inputs=inputs, progress=_kill_at(6))
    result = fit(new_model(META, 0), train, val, cfg, out, CPU, META, tracker=resumed, inputs=inputs, resume="auto")
    assert result.resumed_from == 1 and len(killed.rows) == 2
    assert resumed.rows == whole.rows and len(whole.rows) == 4  # the killed epochs replayed, then the rest
    for name in ("best.pt", "last.pt", *(f"top/{f}" for f in os.listdir(tmp_path / "whole" / "top"))):
        assert _state_dicts_equal(tmp_path / "whole" / name, out / name), name


@pytest.mark.parametrize(("change", "named"), [
    ({"cfg": {"lr": 0.5}}, "lr"),
    ({"inputs": {"images": "sha-b"}}, "inputs.images"),
    ({"inputs": {"code": "sha-d"}}, "inputs.code"),
])
def test_a_checkpoint_of_other_settings_or_inputs_is_not_resumed(disc_stores, tmp_path, caplog, change, named):
    train, val = _data(disc_stores)
    cfg, inputs = CFG.model_copy(update={"epochs": 2}), {"images": "sha-a", "code": "sha-c"}
    out = _out(tmp_path)
    with pytest.raises(Killed):
        fit(new_model(META, 0), train, val, cfg, out, CPU, META, inputs=inputs, progress=_kill_at(3))
    cfg, inputs = cfg.model_copy(update=change.get("cfg", {})), {**inputs, **change.get("inputs", {})}
    with pytest.raises(ConfigError, match=f"different settings or inputs: {named}$"):
        fit(new_model(META, 0), train, val, cfg, out, CPU, META, inputs=inputs, resume="require")
    with caplog.at_level(logging.INFO, logger="segpipe.train"):
        result = fit(new_model(META, 0), train, val, cfg, out, CPU, META, inputs=inputs, resume="auto")
    assert result.resumed_from is None and result.epochs_run == 2
    assert [m for m in caplog.messages if m.startswith("starting at epoch 0")] == [
        f"starting at epoch 0: {out / 'last.pt'}: cannot resume, made with different settings or inputs: {named}"]


def test_resume_required_without_a_checkpoint_says_so(disc_stores, tmp_path):
    train, val = _data(disc_stores)
    with pytest.raises(ConfigError, match="no checkpoint to resume"):
        fit(new_model(META, 0), train, val, CFG, _out(tmp_path), CPU, META, resume="require")


def test_never_resuming_starts_at_epoch_0_despite_a_compatible_checkpoint(disc_stores, tmp_path):
    train, val = _data(disc_stores)
    cfg, out = CFG.model_copy(update={"epochs": 2}), _out(tmp_path)
    with pytest.raises(Killed):
        fit(new_model(META, 0), train, val, cfg, out, CPU, META, progress=_kill_at(3))
    assert fit(new_model(META, 0), train, val, cfg, out, CPU, META, resume="never").resumed_from is None


def test_a_store_digest_follows_its_bytes_not_its_place(disc_stores, tmp_path):
    images, _ = disc_stores
    copy = shutil.copytree(images.path, tmp_path / "elsewhere" / "copy.zarr")
    assert folder_digest(copy) == folder_digest(images.path)
    chunk = next(p for p in sorted(Path(copy).rglob("*")) if p.is_file() and "c" in p.relative_to(copy).parts)
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 1]))
    assert folder_digest(copy) != folder_digest(images.path)


def test_resume_and_fresh_exclude_each_other():
    from tasks.train import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--dataset", "kvasir", "--arch", "unet", "--fold", "0", "--resume", "--fresh"])
