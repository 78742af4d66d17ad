import torch

from segpipe.config import TrainConfig
from segpipe.data import load_samples
from segpipe.train import fit, load_model, new_model

CFG = TrainConfig(
    archs=("unet",), folds=(0,), epochs=25, steps_per_epoch=2, batch_size=4, lr=0.01, patience=25, channels=(8, 16, 32), seed=0
)
META = {"arch": "unet", "classes": ["disc"], "in_channels": 1, "image_size": [32, 32], "channels": [8, 16, 32]}


def _data(disc_stores):
    images, labels = disc_stores
    cases = images.case_ids()
    return load_samples(images, labels, cases[:8], (32, 32), 1), load_samples(images, labels, cases[8:], (32, 32), 1)


def test_training_learns_discs_and_best_checkpoint_holds_the_best_epoch(disc_stores, tmp_path):
    train, val = _data(disc_stores)
    assert train[0].shape == (8, 1, 32, 32) and train[1].shape == (8, 1, 32, 32)
    out = tmp_path / "model"
    out.mkdir()
    result = fit(new_model(META, 0), train, val, CFG, out, torch.device("cpu"), META)
    assert result.best_dice > 0.8
    best, meta = load_model(out / "best.pt", torch.device("cpu"))
    assert meta["epoch"] == result.best_epoch and meta["val_dice"] == result.best_dice
    assert {p.name for p in out.iterdir()} == {"best.pt", "last.pt", "train_state.pt"}


def test_early_stopping_stops_patience_epochs_after_the_best(disc_stores, tmp_path):
    train, val = _data(disc_stores)
    cfg = CFG.model_copy(update={"epochs": 40, "patience": 2, "lr": 0.05})
    result = fit(new_model(META, 0), train, val, cfg, tmp_path, torch.device("cpu"), META)
    assert result.stopped_early
    assert result.epochs_run == result.best_epoch + cfg.patience + 1
    assert torch.load(tmp_path / "train_state.pt")["best_epoch"] == result.best_epoch


def test_same_seed_gives_bitwise_identical_weights_on_cpu(disc_stores, tmp_path):
    train, val = _data(disc_stores)
    cfg = CFG.model_copy(update={"epochs": 2})
    weights = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        torch.rand(ord(run))  # different global RNG state before each run must not matter
        fit(new_model(META, cfg.seed), train, val, cfg, tmp_path / run, torch.device("cpu"), META)
        weights.append(torch.load(tmp_path / run / "last.pt")["state_dict"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_batches_visit_every_sample_equally_often_across_steps():
    from segpipe.train import next_batches

    seen = torch.cat(list(next_batches(10, 4, steps=5, generator=torch.Generator().manual_seed(0))))
    assert len(seen) == 20 and torch.bincount(seen, minlength=10).tolist() == [2] * 10


def test_hflip_mirrors_image_and_every_mask_channel_together():
    from segpipe.train import random_hflip

    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    y = torch.stack([x[:, 0], -x[:, 0]], dim=1)  # two mask channels derived from the image
    fx, fy = random_hflip(x, y, torch.Generator().manual_seed(3))
    flipped = [not torch.equal(fx[i], x[i]) for i in range(2)]
    assert any(flipped)
    for i in range(2):
        assert torch.equal(fy[i, 0], fx[i, 0]) and torch.equal(fy[i, 1], -fx[i, 0])
