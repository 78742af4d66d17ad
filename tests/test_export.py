"""The exported MONAI bundle (segpipe.export, tasks.export): it runs through `python -m monai.bundle
run` where segpipe cannot be imported, and gives the ensemble stage's probabilities and masks."""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import onnxruntime
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from segpipe import bundle_runtime, ensemble_core, export, store, tiling
from segpipe.config import EnsembleConfig, InferConfig
from segpipe.datasets import RawCase, hand_xray, kvasir, usc_timit
from segpipe.datasets.demo_usc import write_avi
from segpipe.encoded_image import EncodedImage
from segpipe.ensemble import ensemble_stores, mean_block
from segpipe.export import PORTABLE, SOURCE, export_bundle, to_onnx, to_torchscript
from segpipe.infer import predict_store
from segpipe.store import CaseStore
from segpipe.train import new_model, save_checkpoint
from tests.pipeline_repo import env

# Runs monai.bundle where `import segpipe` fails: a meta path finder ahead of every other refuses it
# (the editable install would find it otherwise), and the wrapper proves that before starting.
WITHOUT_SEGPIPE = """
import runpy, sys

class NoSegpipe:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("segpipe", "tasks"):
            raise ImportError(f"segpipe is not installed here (import {name!r} refused)")
        return None

sys.meta_path.insert(0, NoSegpipe())
try:
    import segpipe
except ImportError:
    pass
else:
    raise SystemExit("segpipe imported despite the block")
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


def unet_meta(in_channels: int = 1, classes: int = 2, size: int = 32) -> dict:
    return {"arch": "unet", "fold": 0, "classes": [f"c{i}" for i in range(classes)], "in_channels": in_channels,
            "image_size": [size, size], "channels": [8, 16, 32], "tile_scale": None, "res_units": 1}


def test_portable_modules_import_nothing_of_segpipe_but_each_other():
    for name in PORTABLE:
        tree = ast.parse((SOURCE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in PORTABLE, f"{name}: from {'.' * node.level}{node.module}"
            elif isinstance(node, ast.ImportFrom):
                assert node.module.partition(".")[0] not in ("segpipe", "tasks"), f"{name}: from {node.module}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.partition(".")[0] in ("segpipe", "tasks") for a in node.names), name


def test_the_bundles_weighted_mean_is_the_ensemble_stages():
    rng = np.random.default_rng(0)
    probs = [(rng.integers(0, 1025, (3, 2, 5, 7)) / 1024).astype(np.float16) for _ in range(3)]
    weights = np.array([0.2, 0.5, 0.3]) / 1.0000001
    ours = ensemble_core.weighted_mean(iter(probs), [float(w) for w in weights])
    assert ours.dtype == np.float16
    assert np.array_equal(ours, mean_block(probs, weights, True, slice(0, 3), slice(None)))
    masks = ensemble_core.cut(ours, [0.3, 0.6])
    assert masks.dtype == np.uint8 and np.array_equal(masks[:, 1], (ours[:, 1].astype(np.float32) >= 0.6))
    assert np.array_equal(ensemble_core.cut(ours[0], [0.3, 0.6]), masks[0])  # an image: (K, H, W)


def test_the_bundle_chunks_an_image_as_the_store_does():
    assert all(tiling.even_tile(size, chunk) == store.even_tile(size, chunk)
               for size in (1, 63, 256, 511, 512, 513, 529, 2048, 2049) for chunk in (64, 500, 512))


def stored_pixels(reader, path: Path, **meta) -> np.ndarray:
    """The pixels of `path` as ingest stores them (an image kept as its file, decoded)."""
    image = reader.load_case(RawCase(path.stem, path.stem, path, meta=meta)).image
    return image.pixels() if isinstance(image, EncodedImage) else image


def test_the_bundle_decodes_input_files_to_the_pixels_ingest_stores(tmp_path, phantom):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    wide = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    Image.fromarray(rgb).save(tmp_path / "colour.jpg", quality=80)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(wide).save(tmp_path / "wide.png")
    for name in ("colour.jpg", "colour.png", "grey.png", "wide.png"):
        ours = bundle_runtime.read_rgb(tmp_path / name)
        assert np.array_equal(ours, stored_pixels(kvasir, tmp_path / name)), name
    for name in ("colour.png", "grey.png", "wide.png"):
        ours = bundle_runtime.read_grey(tmp_path / name)
        theirs = stored_pixels(hand_xray, tmp_path / name, split="test")
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), name

    frames = rng.integers(0, 256, (6, 32, 48), dtype=np.uint8)
    write_avi(tmp_path / "clip.avi", frames, Fraction(25))
    with av.open(str(tmp_path / "clip.mp4"), "w") as container:  # YUV, as the 75-speaker release
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
        container.mux(stream.encode())
    for path in [tmp_path / "clip.avi", tmp_path / "clip.mp4", next((phantom / "usc_timit").glob("*/mri/*.avi"))]:
        assert np.array_equal(bundle_runtime.read_video(path), stored_pixels(usc_timit, path)), path


@pytest.mark.parametrize("arch", ["unet", "segresnet", "attention_unet", "dynunet"])
def test_torchscript_gives_the_networks_logits_bit_for_bit(arch):
    meta = {**unet_meta(3), "arch": arch}
    model = new_model(meta, 0).eval()
    inputs = [export.example_input(meta, 1), export.example_input(meta, 3)]
    scripted, exact = to_torchscript(model, inputs)
    assert exact
    with torch.inference_mode():
        assert torch.equal(scripted(inputs[1] * 2), model(inputs[1] * 2))


def test_onnx_file_gives_the_networks_logits_in_onnxruntime(tmp_path):
    meta = unet_meta(1)
    model = new_model(meta, 0).eval()
    assert to_onnx(model, export.example_input(meta, 1), tmp_path / "m.onnx") == (True, None)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = export.example_input(meta, 3)  # another batch size than exported with
    with torch.inference_mode():
        expected = model(x).numpy()
    (logits,) = session.run(None, {"image": x.numpy()})
    assert logits.shape == expected.shape and np.abs(logits - expected).max() < 1e-4


class NotExportable(nn.Module):
    """A network whose export fails, as one using an operator that ONNX lacks does."""

    def forward(self, x):
        raise NotImplementedError("an operator ONNX lacks")


def test_a_network_that_does_not_export_to_onnx_is_skipped_with_its_reason(tmp_path):
    any_batch, reason = to_onnx(NotExportable(), torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    assert not any_batch and "an operator ONNX lacks" in reason and not (tmp_path / "m.onnx").exists()


def run_bundle(bundle: Path, inputs: Path, outputs: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in env().items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_SEGPIPE, "run", "--config_file", "configs/inference.json",
         "--meta_file", "configs/metadata.json", "--input_dir", str(inputs), "--output_dir", str(outputs)],
        cwd=bundle, env=clean, capture_output=True, text=True)


def assert_outputs_match(outputs: Path, ensemble: CaseStore, case_ids: list[str]) -> None:
    """Every case's .npz holds the ensemble store's probabilities (within 1e-4) and masks."""
    assert sorted(p.stem for p in outputs.glob("*.npz")) == sorted(case_ids)
    for case_id in case_ids:
        with np.load(outputs / f"{case_id}.npz") as out:
            prob, mask, classes = out["prob"], out["mask"], list(out["classes"])
        expected_prob, expected_mask = ensemble.read(case_id, "prob"), ensemble.read(case_id, "mask")
        assert classes == ensemble.classes
        assert prob.dtype == np.float16 and mask.dtype == np.uint8 and prob.shape == expected_prob.shape
        assert np.abs(prob.astype(np.float32) - expected_prob.astype(np.float32)).max() <= 1e-4, case_id
        assert np.array_equal(mask, expected_mask), case_id


@contextmanager
def one_torch_thread():
    """How the pipeline's Dask workers predict (Dask starts them with OMP_NUM_THREADS=1), and the
    bundle by default: torch rounds some CPU kernels differently with more threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_a_tiled_ensemble_bundle_gives_the_stages_answer_band_by_band(tmp_path):
    """Tiles at half scale, a 16-bit X-ray taller than one band of chunk rows, two members: the
    infer and ensemble stages' library calls against the bundle run without segpipe."""
    image = np.random.default_rng(0).integers(0, 65536, (300, 170), dtype=np.uint16)
    images = CaseStore.create(tmp_path / "images.zarr", dataset="hand_xray", classes=["a", "b"])
    images.write_case("hand", {"kind": "image"})
    images.write_array("hand", "image", image, chunk=128)  # rows in chunks of 100: even_tile(300, 128)
    cfg = InferConfig(batch_size=3, hflip=True, band_rows=200)  # bands (0, 200), (200, 300)
    checkpoints, members = [], []
    for fold, dice in enumerate((0.6, 0.3)):
        meta = {**unet_meta(1), "fold": fold, "tile_scale": 0.5, "val_dice": dice}
        checkpoints.append(tmp_path / f"fold{fold}.pt")
        save_checkpoint(checkpoints[-1], new_model(meta, fold).eval(), meta)
        members.append(tmp_path / f"fold{fold}.zarr")
        with one_torch_thread():
            predict_store(checkpoints[-1], images, {"hand": "test"}, members[-1], cfg)
    recorded = ensemble_stores(members, tmp_path / "ensemble.zarr", EnsembleConfig(tune=False, threshold=0.45))
    bundle = tmp_path / "bundle"
    export_bundle("hand_xray", checkpoints, recorded, bundle, cfg, chunk=128)
    (tmp_path / "inputs").mkdir()
    Image.fromarray(image).save(tmp_path / "inputs" / "hand.png")

    result = run_bundle(bundle, tmp_path / "inputs", tmp_path / "outputs")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_outputs_match(tmp_path / "outputs", CaseStore(tmp_path / "ensemble.zarr"), ["hand"])
    assert json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"][
        "image"]["is_patch_data"]


# --- the bundle of the trained demo, against the ensemble stage ------------------------------------


def demo_inputs(repo: Path, dataset: str, folder: Path) -> dict[str, Path]:
    """The ensemble store's cases, each as its raw file copied into `folder` under its case id."""
    ensemble = CaseStore(repo / "data" / "predictions" / dataset / "ensemble.zarr")
    images = CaseStore(repo / "data" / "interim" / f"{dataset}.zarr")
    raw = repo / yaml.safe_load((repo / "params.yaml").read_text())["datasets"][dataset]["raw"]
    folder.mkdir()
    files = {}
    for case_id in ensemble.case_ids():
        source = raw / images.case_attrs(case_id)["source"]
        files[case_id] = folder / f"{case_id}{source.suffix}"
        shutil.copyfile(source, files[case_id])
    return files


def export_with_the_stage(repo: Path, dataset: str, out: Path) -> Path:
    result = subprocess.run([sys.executable, "-m", "tasks.export", "--dataset", dataset, "--out", str(out)],
                            cwd=repo, env=env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["kvasir", "hand_xray", "usc_timit"])
def test_bundle_run_without_segpipe_gives_the_ensemble_stores_probabilities_and_masks(trained_repo, tmp_path, dataset):
    bundle = export_with_the_stage(trained_repo, dataset, tmp_path / "bundle")
    files = demo_inputs(trained_repo, dataset, tmp_path / "inputs")
    result = run_bundle(bundle, tmp_path / "inputs", tmp_path / "outputs")
    assert result.returncode == 0, result.stdout + result.stderr

    ensemble = CaseStore(trained_repo / "data" / "predictions" / dataset / "ensemble.zarr")
    assert_outputs_match(tmp_path / "outputs", ensemble, list(files))


@pytest.mark.slow
def test_bundle_files_metadata_and_onnx_members_of_the_trained_demo(trained_repo, tmp_path):
    bundle = export_with_the_stage(trained_repo, "kvasir", tmp_path / "bundle")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    recorded = json.loads((trained_repo / "reports" / "kvasir" / "ensemble.json").read_text())
    members = meta["segpipe"]["members"]
    assert [(m["arch"], m["fold"], m["weight"]) for m in members] == [
        (m["arch"], m["fold"], m["weight"]) for m in recorded["members"]]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "polyp"}
    assert {"version", "monai_version", "pytorch_version", "numpy_version", "task", "description"} <= meta.keys()
    for name in PORTABLE:  # the code that exported it
        assert (bundle / "scripts" / f"{name}.py").read_bytes() == (trained_repo / "segpipe" / f"{name}.py").read_bytes()
    assert (bundle / "docs" / "README.md").is_file()
    image = meta["network_data_format"]["inputs"]["image"]
    for member in members:
        assert member["torchscript_exact"] and member["onnx"], member
        scripted = torch.jit.load(str(bundle / member["torchscript"]))
        session = onnxruntime.InferenceSession(str(bundle / member["onnx"]), providers=["CPUExecutionProvider"])
        x = export.example_input({"image_size": image["spatial_shape"], "in_channels": image["num_channels"]}, 2)
        with torch.inference_mode():
            expected = scripted(x).numpy()
        (logits,) = session.run(None, {"image": x.numpy()})
        assert np.abs(logits - expected).max() < 1e-4
