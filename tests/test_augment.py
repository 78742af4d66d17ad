"""segpipe.augment: seeded, shape-preserving augmentation that moves image and masks together."""
from __future__ import annotations

import random
from collections import Counter

import albumentations as A
import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from segpipe import augment
from segpipe.config import DatasetAugment, load_params
from segpipe.errors import ConfigError
from segpipe.plan import PRESETS
from tests.conftest import ROOT

GEOMETRY = DatasetAugment(hflip=0.5, vflip=0.5, affine=1.0, elastic=1.0, rotate=20, translate=0.1)
KVASIR = DatasetAugment(hflip=0.5, vflip=0.5, affine=0.5, color_jitter=0.8, black_corner=0.3)
LEVELS = np.linspace(0.1, 0.9, 29)


def smooth_image(size: int = 96, channels: int = 1) -> np.ndarray:
    """Two off-centre Gaussian bumps in [0, 1]: asymmetric, so any flip or rotation shows."""
    yy, xx = np.mgrid[:size, :size] / size
    bumps = np.exp(-((yy - 0.35) ** 2 + (xx - 0.3) ** 2) / 0.03) + 0.6 * np.exp(
        -((yy - 0.7) ** 2 + (xx - 0.65) ** 2) / 0.015
    )
    image = (bumps / bumps.max()).astype(np.float32)
    return np.repeat(image[..., None], channels, axis=-1)


def level_masks(image: np.ndarray) -> np.ndarray:
    """29 nested, overlapping channels: the image thresholded at 29 levels."""
    return (image[..., :1] > LEVELS).astype(np.uint8)


def leaf_names(steps: list) -> list[str]:
    """Transform names, looking inside the uint8 wrappers."""
    leaves = [t for step in steps for t in getattr(step, "transforms", [step])]
    return [type(t).__name__ for t in leaves if not isinstance(t, (A.FromFloat, A.ToFloat))]


def test_same_seed_same_output_and_different_seeds_differ():
    aug = augment.build(KVASIR)
    image, mask = smooth_image(channels=3), level_masks(smooth_image())
    first = aug(image, mask, seed=7)
    aug(image, mask, seed=8)  # call history and global RNG state must not matter
    np.random.seed(123)
    random.seed(123)
    again = aug(image, mask, seed=7)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    images = {aug(image, mask, seed=s)[0].tobytes() for s in range(10)}
    assert len(images) >= 8


def test_hflip_and_vflip_draw_independently():
    image = np.arange(16, dtype=np.float32).reshape(4, 4, 1) / 16
    mask = np.zeros((4, 4, 1), np.uint8)
    aug = augment.build(DatasetAugment(hflip=0.5, vflip=0.5))
    outcomes = {"none": image, "h": image[:, ::-1], "v": image[::-1], "hv": image[::-1, ::-1]}
    seen = Counter(
        next(name for name, ref in outcomes.items() if np.array_equal(aug(image, mask, s)[0], ref))
        for s in range(400)
    )
    assert set(seen) == set(outcomes)
    assert all(60 <= n <= 140 for n in seen.values()), seen


@pytest.mark.parametrize("channels", [1, 3])
def test_every_mask_channel_follows_the_image_geometry(channels):
    image = smooth_image(channels=channels)
    mask = level_masks(image)
    aug = augment.build(GEOMETRY)
    moved = 0
    for seed in range(6):
        out_image, out_mask = aug(image, mask, seed)
        assert out_image.dtype == np.float32 and out_image.shape == image.shape
        assert out_mask.dtype == np.uint8 and out_mask.shape == mask.shape
        assert set(np.unique(out_mask)) <= {0, 1}
        # The image is resampled linearly, the masks nearest-neighbour: they may differ on the level
        # line's one-pixel border only.
        disagree = ((out_image[..., :1] > LEVELS) != out_mask.astype(bool)).mean(axis=(0, 1))
        assert disagree.max() < 0.02, disagree
        moved += (out_mask != mask).mean() > 0.05
    assert moved == 6


def test_channels_are_transformed_alike_whatever_their_number():
    image = smooth_image()
    mask = level_masks(image)
    aug = augment.build(GEOMETRY)
    _, together = aug(image, mask, seed=3)
    for k in (0, 4, 5, 28):
        _, alone = aug(image, mask[..., k:k + 1], seed=3)
        assert np.array_equal(together[..., k], alone[..., 0])


def test_inputs_are_left_untouched_and_outputs_own_their_memory():
    image = smooth_image(channels=3)
    mask = level_masks(image)
    image_before, mask_before = image.copy(), mask.copy()
    out_image, out_mask = augment.build(DatasetAugment(hflip=1.0))(image, mask, seed=0)
    assert np.array_equal(image, image_before) and np.array_equal(mask, mask_before)
    assert not np.shares_memory(out_image, image) and not np.shares_memory(out_mask, mask)
    assert np.array_equal(out_mask, mask[:, ::-1])


def test_nothing_switched_on_builds_nothing():
    assert augment.build(DatasetAugment()) is None
    assert augment.build(DatasetAugment(rotate=30, jitter=0.5)) is None


def test_black_corner_darkens_only_the_lower_left_and_keeps_masks():
    image = np.full((100, 120, 3), 0.6, np.float32)
    mask = np.zeros((100, 120, 2), np.uint8)
    mask[70:, :30, 0] = 1  # under the box: must survive it
    mask[:, 60:, 1] = 1
    aug = augment.build(DatasetAugment(black_corner=1.0, black_corner_size=(0.2, 0.45)))
    sizes = set()
    for seed in range(8):
        out_image, out_mask = aug(image, mask, seed)
        assert np.array_equal(out_mask, mask)
        dark = (out_image == 0).all(axis=-1)
        rows, cols = np.nonzero(dark)
        box_h, box_w = 100 - rows.min(), cols.max() + 1
        assert rows.max() == 99 and cols.min() == 0
        assert dark[100 - box_h:, :box_w].all() and dark.sum() == box_h * box_w
        assert 20 <= box_h <= 45 and 24 <= box_w <= 54
        assert np.all(out_image[~dark] == 0.6)
        sizes.add((box_h, box_w))
    assert len(sizes) >= 6


def test_clahe_on_one_channel_raises_contrast_and_keeps_masks():
    rng = np.random.default_rng(0)
    flat = (0.45 + 0.05 * smooth_image(128) + rng.normal(0, 0.01, (128, 128, 1))).astype(np.float32)
    mask = level_masks(smooth_image(128))
    aug = augment.build(DatasetAugment(clahe=1.0, clahe_clip=4.0))
    for seed in range(6):
        out_image, out_mask = aug(np.clip(flat, 0, 1), mask, seed)
        assert out_image.shape == (128, 128, 1) and out_image.dtype == np.float32
        assert 0 <= out_image.min() and out_image.max() <= 1
        assert out_image.std() > 1.5 * flat.std()  # even the mildest clip limit, 1, stretches it 1.6x
        assert np.array_equal(out_mask, mask)


def test_color_jitter_keeps_range_and_masks_on_grey_and_colour():
    aug = augment.build(DatasetAugment(color_jitter=1.0, jitter=0.5, hue=0.1))
    for channels in (1, 3):
        image = smooth_image(channels=channels)
        mask = level_masks(image)
        out_image, out_mask = aug(image, mask, seed=2)
        assert out_image.shape == image.shape and 0 <= out_image.min() and out_image.max() <= 1
        assert not np.allclose(out_image, image) and np.array_equal(out_mask, mask)


def test_color_jitter_in_uint8_keeps_the_grey_levels_when_it_changes_nothing():
    image = smooth_image(channels=3)
    aug = augment.build(DatasetAugment(color_jitter=1.0, jitter=0.0, hue=0.0))
    out_image, _ = aug(image, level_masks(image), seed=0)
    assert np.abs(out_image - image).max() <= 0.5 / 255 + 1e-6


def test_wrong_dtypes_or_shapes_are_refused():
    aug = augment.build(KVASIR)
    image, mask = smooth_image(channels=3), level_masks(smooth_image())
    with pytest.raises(ValueError, match="image must be float32"):
        aug((image * 255).astype(np.uint8), mask, 0)
    with pytest.raises(ValueError, match="mask must be uint8"):
        aug(image, mask[:50], 0)


def test_each_preset_of_the_plan_builds_as_promised():
    names = {name: leaf_names(augment.transforms(preset)) for name, preset in PRESETS.items()}
    assert names["colour"] == ["HorizontalFlip", "VerticalFlip", "Affine", "ColorJitter"]
    assert names["video"] == ["Affine"]
    assert names["grey"] == ["HorizontalFlip", "Affine", "CLAHE"]
    with pytest.raises(ConfigError, match="augment.nope"):
        load_params(ROOT / "params.yaml").augment.for_dataset("nope")


def test_bad_augment_params_name_the_key(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["augment"]["kvasir"] = {"hflp": 0.5}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"augment\.kvasir\.hflp"):
        load_params(path)
    with pytest.raises(ValidationError, match="scale"):
        DatasetAugment(scale=(1.2, 0.8))
    with pytest.raises(ValidationError, match="black_corner_size"):
        DatasetAugment(black_corner_size=(0.5, 1.5))
