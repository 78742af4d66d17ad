"""The architecture registry: every network x every loss learns, shapes, sizes, local encoder weights."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from segpipe import losses, models
from segpipe.errors import ConfigError
from segpipe.preprocess import frames_to_input
from tests.conftest import disc_case

CHANNELS = (8, 16, 32)


def smallest_size(arch: str) -> int:
    return 2 * models.ARCHS[arch].size_multiple(CHANNELS)


def two_class_batch(size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Two disc images; class 0 the disc, class 1 the same disc cut in two by a 2-px gap: the
    classes overlap, and class 1 has two objects for the border-weighted loss."""
    rng = np.random.default_rng(0)
    cases = [disc_case(rng, size) for _ in range(2)]
    discs = np.stack([mask[0] for _, mask in cases])
    halves = discs.copy()
    for half in halves:
        rows = np.flatnonzero(half.any(axis=1))
        middle = rows[len(rows) // 2]
        half[middle - 1 : middle + 1] = 0
    return frames_to_input(np.stack([image for image, _ in cases]), 1), np.stack([discs, halves], axis=1)


@pytest.mark.parametrize("loss_name", sorted(losses.LOSSES))
@pytest.mark.parametrize("arch", sorted(models.ARCHS))
def test_every_architecture_learns_with_every_loss(arch, loss_name):
    x, masks = two_class_batch(smallest_size(arch))
    target = torch.from_numpy(masks).float()
    loss_fn = losses.build(loss_name)
    extra = ()
    if getattr(loss_fn, "needs_weight_map", False):
        extra = (torch.from_numpy(np.stack([loss_fn.weight_map(m) for m in masks])),)
    torch.manual_seed(0)
    model = models.build(arch, 1, 2, CHANNELS)
    if extra and arch == "dynunet":
        with pytest.raises(ConfigError, match="weight map cannot train a deep-supervision network"):
            losses.output_loss(loss_fn, model(x), target, *extra)
        return
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    history = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = losses.output_loss(loss_fn, model(x), target, *extra)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    # Observed ratios 0.15..0.89 on this fixed batch; a model or loss that does not learn stays ~1.
    assert np.mean(history[-3:]) < 0.95 * history[0], history


@pytest.mark.parametrize("arch", sorted(models.ARCHS))
def test_every_architecture_maps_an_image_batch_to_per_class_logits_of_the_same_size(arch):
    size = smallest_size(arch)
    model = models.build(arch, 3, 5, CHANNELS).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, 2 * size))
    assert isinstance(out, torch.Tensor)  # unetpp's deep-supervision list is reduced to its final output
    assert out.shape == (2, 5, size, 2 * size)


def test_dynunet_trains_on_its_final_and_upsampled_deeper_outputs_weighted_by_halves():
    x, masks = two_class_batch(smallest_size("dynunet"))
    target, loss_fn = torch.from_numpy(masks).float(), losses.build("bce_dice")
    torch.manual_seed(0)
    model = models.build("dynunet", 1, 2, CHANNELS)
    heads = model(x)  # training mode: the final output and one deeper level's, at the input's size
    assert heads.shape == (2, 2, 2, *x.shape[-2:])
    expected = loss_fn(heads[:, 0], target) + 0.5 * loss_fn(heads[:, 1], target)
    assert losses.output_loss(loss_fn, heads, target).item() == pytest.approx(expected.item(), rel=1e-6)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 2, *x.shape[-2:])


def test_widths_follow_the_channels_param_cut_or_doubled_to_the_levels_an_architecture_has():
    assert models.widths((16, 32, 64, 128), 5) == (16, 32, 64, 128, 256)
    assert models.widths((8, 16, 32, 64, 128, 256), 5) == (8, 16, 32, 64, 128)
    segresnet = models.build("segresnet", 1, 2, (16, 32, 64, 128))
    assert segresnet.convInit.conv.out_channels == 16
    assert len(segresnet.down_layers) == 4
    assert models.build("swin_unetr", 1, 2, (16, 32)).swinViT.embed_dim == 24  # 16 rounded up to 12s


def test_unknown_architecture_is_a_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError, match="unknown architecture 'unet3'.*swin_unetr"):
        models.build("unet3", 1, 2, CHANNELS)


@pytest.mark.parametrize(
    ("arch", "size", "ok"),
    [("unet", (32, 36), True), ("unet", (32, 34), False), ("unet", (4, 8), False), ("swin_unetr", (64, 96), True),
     ("swin_unetr", (32, 64), False), ("flexible_unet", (48, 64), False), ("unetpp", (32, 48), True)],
)
def test_input_sizes_are_checked_against_each_architectures_divisibility(arch, size, ok):
    if ok:
        models.check_input_size(arch, CHANNELS, size)
    else:
        with pytest.raises(ConfigError, match=f"{arch} needs H and W multiples of"):
            models.check_input_size(arch, CHANNELS, size)


def encoder_state(in_channels: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return models.build("flexible_unet", in_channels, 2, CHANNELS).encoder.state_dict()


def test_flexible_unet_loads_its_encoder_from_a_local_file_in_monais_layout(tmp_path):
    saved = encoder_state(1, seed=1)
    torch.save(saved, tmp_path / "encoder.pt")
    torch.manual_seed(2)
    model = models.build("flexible_unet", 1, 2, CHANNELS, encoder_weights=tmp_path / "encoder.pt")
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert not torch.equal(encoder_state(1, seed=2)["_conv_stem.weight"], saved["_conv_stem.weight"])


def test_flexible_unet_loads_released_rgb_weights_into_a_grayscale_network(tmp_path):
    """The released efficientnet-pytorch files number blocks globally, lack BN counters and have
    an RGB stem: the stem is summed over colours for a 1-channel input."""
    rgb = encoder_state(3, seed=1)
    released = {
        re.sub(r"^_blocks\.\d+\.", "_blocks.", key): value
        for key, value in rgb.items() if not key.endswith("num_batches_tracked")
    }
    assert "_blocks.15._depthwise_conv.weight" in released  # b0's last block, globally numbered
    torch.save(released, tmp_path / "efficientnet-b0.pth")
    model = models.build("flexible_unet", 1, 2, CHANNELS, encoder_weights=tmp_path / "efficientnet-b0.pth")
    loaded = model.encoder.state_dict()
    assert torch.equal(loaded["_conv_stem.weight"], rgb["_conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(loaded["_blocks.6.15._depthwise_conv.weight"], rgb["_blocks.6.15._depthwise_conv.weight"])


def test_flexible_unet_rejects_a_missing_or_foreign_weights_file_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"absent\.pt: train.encoder_weights: no such file"):
        models.build("flexible_unet", 1, 2, CHANNELS, encoder_weights=tmp_path / "absent.pt")

    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"notes\.pt: train.encoder_weights: not a PyTorch weights file"):
        models.build("flexible_unet", 1, 2, CHANNELS, encoder_weights=tmp_path / "notes.pt")

    torch.save(models.build("unet", 1, 2, CHANNELS).state_dict(), tmp_path / "unet.pt")
    with pytest.raises(ConfigError, match=r"unet\.pt: .*not weights of this EfficientNetEncoder: \d+ missing"):
        models.build("flexible_unet", 1, 2, CHANNELS, encoder_weights=tmp_path / "unet.pt")

    torch.save(encoder_state(1, seed=0), tmp_path / "b0.pt")  # right keys, wrong backbone size
    with pytest.raises(ConfigError, match=r"b0\.pt: .*of another shape \(e\.g\. \['_conv_stem.weight"):
        models.build("flexible_unet", 1, 2, CHANNELS, encoder="efficientnet-b3", encoder_weights=tmp_path / "b0.pt")
