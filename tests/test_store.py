"""segpipe.store: the layout of what a case's arrays become, written and read through zarr."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import zarr

from segpipe.encoded_image import EncodedImage
from segpipe.errors import StoreError
from segpipe.store import ZARRS, CaseStore


def files_of(path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def hand_like(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 1024 px image and a 5-class mask with one blob per class: most one-class tiles empty."""
    image = rng.integers(0, 255, (1024, 1024), dtype=np.uint8)
    mask = np.zeros((5, 1024, 1024), np.uint8)
    for c in range(5):
        y, x = rng.integers(0, 900, 2)
        mask[c, y : y + 100, x : x + 60] = 1
    return image, mask


def test_zarrs_writes_on_one_thread():
    """With several threads zarrs lays a shard's chunks out in the order they finish (see segpipe.store)."""
    assert zarr.config.get("codec_pipeline.path") == ZARRS["codec_pipeline.path"]
    assert zarr.config.get("threading.max_workers") == 1


def test_the_same_case_written_twice_gives_the_same_files(tmp_path):
    """DVC hashes the files: a shard's chunks must lie in the same order on every write."""
    image, mask = hand_like(np.random.default_rng(0))
    for name in ("a", "b"):
        store = CaseStore.create(tmp_path / f"{name}.zarr", dataset="d", classes=list("vwxyz"))
        store.write_case("case", {"kind": "image"}, {"image": image, "mask": mask}, chunk=256)
    assert files_of(tmp_path / "a.zarr") == files_of(tmp_path / "b.zarr")


def test_a_mask_is_one_class_per_tile_and_its_empty_tiles_are_not_stored(tmp_path):
    image, mask = hand_like(np.random.default_rng(1))
    store = CaseStore.create(tmp_path / "s.zarr", dataset="d", classes=list("vwxyz"))
    store.write_case("case", {"kind": "image"}, {"image": image, "mask": mask}, chunk=256)
    array = store.array("case", "mask")
    assert array.chunks == (1, 256, 256) and array.shards == (5, 1024, 1024)  # one file holds them all
    # A blob touches at most 4 of its class's 16 tiles: the other tiles, stored, would take more room
    # (as zarr's own codec pipeline stores them when told to; zarrs leaves empty chunks out regardless).
    with zarr.config.set({"codec_pipeline.path": "zarr.core.codec_pipeline.BatchedCodecPipeline",
                          "array.write_empty_chunks": True}):
        store.write_case("dense", {"kind": "image"}, {"mask": mask}, chunk=256)
    dense = store.array("dense", "mask")
    assert dense.chunks == array.chunks and array.nbytes_stored() < dense.nbytes_stored() - 60 * 16
    np.testing.assert_array_equal(store.read("case", "mask"), mask)
    np.testing.assert_array_equal(store.image("case")[100:300, 500:700], image[100:300, 500:700])


def test_an_image_kept_as_its_file_is_a_plain_byte_array_that_decodes_to_its_pixels(tmp_path):
    from PIL import Image
    pixels = np.random.default_rng(2).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    store = CaseStore.create(tmp_path / "s.zarr", dataset="d", classes=["x"])
    store.write_case("case", {"kind": "image"}, {"image": EncodedImage.read(tmp_path / "a.png", "RGB")})
    array = store.array("case", "image")
    assert array.dtype == np.uint8 and array.ndim == 1 and array[:].tobytes() == (tmp_path / "a.png").read_bytes()
    assert dict(array.attrs) == {"encoded_image": {"format": "PNG", "mode": "RGB", "shape": [30, 40, 3]}}
    decoded = store.image("case")
    np.testing.assert_array_equal(decoded, pixels)
    assert decoded.flags.writeable  # torch.from_numpy warns of a read-only array


def test_a_stored_file_that_no_longer_decodes_is_named(tmp_path):
    from PIL import Image
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "a.png")
    store = CaseStore.create(tmp_path / "s.zarr", dataset="d", classes=["x"])
    image = EncodedImage.read(tmp_path / "a.png", "RGB")
    store.write_case("case", {"kind": "image"}, {"image": image})
    store.array("case", "image")[:20] = 0  # the file's header overwritten
    with pytest.raises(StoreError, match=r"s\.zarr/case/image: a stored PNG file that not an image"):
        store.image("case")


def test_a_missing_case_or_array_is_a_store_error_naming_it(tmp_path):
    store = CaseStore.create(tmp_path / "s.zarr", dataset="d", classes=["x"])
    store.write_case("case", {"kind": "image"})
    with pytest.raises(StoreError, match="no case 'other'"):
        store.array("other", "image")
    with pytest.raises(StoreError, match="case 'case' has no 'mask' array"):
        store.read("case", "mask")
