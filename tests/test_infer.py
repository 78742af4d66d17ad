import numpy as np
import torch
from torch import nn

from segpipe.config import InferConfig
from segpipe.infer import predict_frames, predict_store
from segpipe.store import CaseStore
from segpipe.train import new_model

CFG = InferConfig(overlap=0.25, mode="gaussian", batch_size=2)


class FirstChannelLogit(nn.Module):
    """A 'model' whose logits are its (z-scored) input repeated per class: lets tests predict by hand."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        return x[:, :1].repeat(1, self.classes, 1, 1)


def test_probabilities_come_back_at_each_frames_original_size_as_float16():
    meta = {"classes": ["a", "b", "c"], "in_channels": 1, "image_size": [32, 32]}
    frames = np.random.default_rng(0).integers(0, 255, (3, 50, 70), dtype=np.uint8)
    probs = predict_frames(FirstChannelLogit(3), frames, meta, CFG, torch.device("cpu"))
    assert probs.shape == (3, 3, 50, 70) and probs.dtype == np.float16
    assert 0 <= probs.min() and probs.max() <= 1
    # Every class channel equals the first: the per-class loop must not mix channels up.
    assert np.array_equal(probs[:, 0], probs[:, 2])


def test_bright_pixels_get_high_probability_with_an_identity_like_model():
    meta = {"classes": ["a"], "in_channels": 1, "image_size": [32, 32]}
    frame = np.zeros((1, 32, 32), np.uint8)
    frame[0, 8:24, 8:24] = 255
    probs = predict_frames(FirstChannelLogit(1), frame, meta, CFG, torch.device("cpu"))
    assert probs[0, 0, 16, 16] > 0.8 and probs[0, 0, 0, 0] < 0.5


def test_prediction_store_has_the_input_case_keys_and_shapes(disc_stores, tmp_path):
    images, _ = disc_stores
    meta = {"arch": "unet", "classes": ["disc"], "in_channels": 1, "image_size": [32, 32], "channels": [8, 16]}
    cases = images.case_ids()[:3]
    predict_store(new_model(meta, 0), meta, images, cases, tmp_path / "pred.zarr", CFG, torch.device("cpu"))
    pred = CaseStore(tmp_path / "pred.zarr")
    assert pred.case_ids() == cases
    assert pred.array(cases[0], "prob").shape == (1, 48, 48)
    assert pred.case_attrs(cases[0])["group"] == images.case_attrs(cases[0])["group"]
