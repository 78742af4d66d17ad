"""segpipe.zarr_files writes the very files zarr-python writes, and zarr reads them back."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from segpipe import zarr_files
from segpipe.errors import StoreError
from tests.test_sparse_mask import random_mask

RNG = np.random.default_rng(0)


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def smooth(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Compressible content with structure along every axis (random noise would hide a mix-up of
    chunk order or padding behind equal incompressible lengths)."""
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (sum((k + 1) * g for k, g in enumerate(grids)) % 251 + RNG.integers(0, 3, shape)).astype(dtype)


CASES = {  # name: (data, chunks, the shards zarr is given: none for one chunk, else one covering all)
    "image one chunk": (smooth((300, 200, 3), "uint8"), (300, 200, 3), None),
    "image with edge chunks": (smooth((529, 622, 3), "uint8"), (512, 512, 3), (1024, 1024, 3)),
    "29-class mask": (smooth((29, 300, 260), "uint8") > 120, (29, 128, 128), (29, 384, 384)),
    "float16 probabilities": (smooth((2, 70, 90), "float16") / 251, (2, 32, 32), (2, 96, 96)),
    "uint16 image": (smooth((70, 90), "uint16") * 250, (64, 64), (128, 128)),
    "video frames": (smooth((69, 68, 68), "uint8"), (16, 68, 68), (80, 68, 68)),
    "video masks": (smooth((40, 1, 68, 68), "uint8") > 100, (16, 1, 68, 68), (48, 1, 68, 68)),
    "frame timestamps": (np.arange(69) / 23.18, (16,), (80,)),
    "float32 confidence": (RNG.random(40).astype("float32"), (40,), None),
    "chunk wider than the array": (smooth((64, 40), "uint8"), (64, 64), (64, 64)),
    "a scalar": (np.array(3.5), (), None),  # its one chunk's key is "c"
}


def compressor_of(array: Path) -> BloscCodec:
    """The compressor the metadata of an array written by write_array names: one of its two."""
    codec = zarr.open_array(array, mode="r").compressors[0]
    chosen = [c for c in (zarr_files.COMPRESSOR, zarr_files.UNCOMPRESSED) if c.clevel == codec.clevel]
    assert len(chosen) == 1 and (codec.cname, codec.shuffle) == (chosen[0].cname, chosen[0].shuffle), codec
    return chosen[0]


@pytest.mark.parametrize("name", CASES)
def test_array_files_are_zarrs_own_bytes(tmp_path, name):
    """Whichever compressor write_array chose (see the tests of that choice below), zarr writes the
    same files with it."""
    data, chunks, shards = CASES[name]
    zarr.open_group(tmp_path / "ours.zarr", mode="w", zarr_format=3)
    zarr_files.write_array(tmp_path / "ours.zarr" / "a", data, chunks)
    by_zarr = zarr.open_group(tmp_path / "zarr.zarr", mode="w", zarr_format=3)
    by_zarr.create_array("a", data=data, chunks=chunks, shards=shards,
                         compressors=compressor_of(tmp_path / "ours.zarr" / "a"),
                         chunk_key_encoding=zarr_files.CHUNK_KEY_ENCODING, config={"write_empty_chunks": True})

    ours = files_under(tmp_path / "ours.zarr" / "a")
    assert ours == files_under(tmp_path / "zarr.zarr" / "a")
    assert len(ours) == 2  # the metadata and one chunk or shard
    read = zarr.open_group(tmp_path / "ours.zarr", mode="r")["a"]
    np.testing.assert_array_equal(read[...], data)
    assert read.dtype == data.dtype


def test_arrays_of_one_kind_in_many_sizes_are_zarrs_own_bytes(tmp_path):
    """Kvasir images differ in size case by case, and each array's document is the cached one of
    its kind with the shapes changed: every size must still come out as zarr writes it."""
    by_zarr = zarr.open_group(tmp_path / "zarr.zarr", mode="w", zarr_format=3)
    zarr.open_group(tmp_path / "ours.zarr", mode="w", zarr_format=3)
    for name, shape, chunks in [("a", (529, 622, 3), (265, 311, 3)), ("b", (1072, 1920, 3), (358, 480, 3)),
                                ("c", (40, 60, 3), (40, 60, 3)), ("d", (41, 60, 3), (41, 60, 3))]:
        data = smooth(shape, "uint8")
        shards = None if chunks == shape else tuple(-(-s // c) * c for s, c in zip(shape, chunks))
        zarr_files.write_array(tmp_path / "ours.zarr" / name, data, chunks)
        by_zarr.create_array(name, data=data, chunks=chunks, shards=shards,
                             compressors=compressor_of(tmp_path / "ours.zarr" / name),
                             chunk_key_encoding=zarr_files.CHUNK_KEY_ENCODING, config={"write_empty_chunks": True})
        assert files_under(tmp_path / "ours.zarr" / name) == files_under(tmp_path / "zarr.zarr" / name), name


def test_arrays_that_lz4_cannot_shrink_are_stored_uncompressed_and_the_rest_compressed(tmp_path):
    """The choice is made on the middle chunk of an array of several chunks: noise (as X-rays are
    to LZ4) is stored as it is; smooth content, any array of one chunk, and masks are compressed."""
    noise = RNG.integers(0, 256, (256, 256), dtype=np.uint8)
    smooth_image = np.add.outer(np.arange(256), np.arange(256)).astype(np.uint8) // 8
    noisy_middle = smooth_image.copy()
    noisy_middle[128:192, 128:192] = noise[:64, :64]  # the middle chunk of a 4 x 4 grid
    mask, _ = random_mask(np.random.default_rng(3), 6, (3, 256, 256))
    cases = [("noise", noise, (64, 64), zarr_files.UNCOMPRESSED), ("smooth", smooth_image, (64, 64), zarr_files.COMPRESSOR),
             ("noisy middle", noisy_middle, (64, 64), zarr_files.UNCOMPRESSED),
             ("noise in one chunk", noise, noise.shape, zarr_files.COMPRESSOR),
             ("mask", mask, (1, 64, 64), zarr_files.COMPRESSOR)]
    for name, data, chunks, expected in cases:
        zarr_files.write_array(tmp_path / name, data, chunks)
        assert compressor_of(tmp_path / name) == expected, name
        np.testing.assert_array_equal(np.asarray(zarr_files.StoredArray(tmp_path / name)), np.asarray(data))
    shard_size = (tmp_path / "noise" / "c.0.0").stat().st_size
    assert shard_size == noise.nbytes + 16 * 16 + 16 * 16 + 4  # a Blosc header per chunk, the index and its crc32c
    assert (tmp_path / "smooth" / "c.0.0").stat().st_size < smooth_image.nbytes / 4


def test_group_files_are_zarrs_own_bytes(tmp_path):
    attrs = {"case_id": "cju0qkwl35piu0993l0dewei2", "bboxes": [{"xmin": 1, "label": "polyp"}],
             "fps": 23.18, "warmup": [], "labelled": True, "speaker": "F1 é"}
    zarr.open_group(tmp_path / "zarr.zarr", mode="w", zarr_format=3).create_group("c", attributes=attrs)
    zarr.open_group(tmp_path / "ours.zarr", mode="w", zarr_format=3)
    zarr_files.write_group(tmp_path / "ours.zarr" / "c", attrs)

    assert files_under(tmp_path / "ours.zarr") == files_under(tmp_path / "zarr.zarr")
    assert zarr.open_group(tmp_path / "ours.zarr", mode="r")["c"].attrs.asdict() == attrs


def test_writing_again_replaces_the_node(tmp_path):
    root = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    zarr_files.write_group(tmp_path / "s.zarr" / "c", {"v": 1})
    zarr_files.write_array(tmp_path / "s.zarr" / "c" / "a", np.ones((64, 64), "uint8"), (32, 32))
    zarr_files.write_array(tmp_path / "s.zarr" / "c" / "b", np.ones(5, "uint8"), (5,))
    zarr_files.write_array(tmp_path / "s.zarr" / "c" / "a", np.full((3, 4), 7, "uint8"), (3, 4))

    np.testing.assert_array_equal(root["c"]["a"][...], np.full((3, 4), 7))
    assert sorted(files_under(tmp_path / "s.zarr" / "c" / "a")) == ["c.0.0", "zarr.json"]
    zarr_files.write_group(tmp_path / "s.zarr" / "c", {"v": 2})  # a new group has none of the old arrays
    assert list(root["c"].array_keys()) == [] and root["c"].attrs["v"] == 2


@pytest.mark.parametrize("shape, chunks", [((29, 300, 260), (1, 128, 128)), ((29, 300, 260), (29, 128, 128)),
                                           ((29, 60, 40), (29, 60, 40))])
@pytest.mark.parametrize("n_patches", [12, 0])
def test_a_sparse_mask_is_written_as_zarr_writes_its_dense_array_without_empty_chunks(tmp_path, shape, chunks,
                                                                                   n_patches):
    """One class per chunk (as masks are stored), all classes per chunk, and one chunk: zarr's own
    files with write_empty_chunks=False, its default. Patches that hold no 1 do not make a chunk."""
    sparse, dense = random_mask(np.random.default_rng(1), n_patches, shape)
    sparse.add(3, slice(0, 2), slice(0, 2), np.zeros((2, 2), bool))
    shards = None if chunks == shape else tuple(-(-s // c) * c for s, c in zip(shape, chunks))
    by_zarr = zarr.open_group(tmp_path / "zarr.zarr", mode="w", zarr_format=3)
    by_zarr.create_array("m", data=dense, chunks=chunks, shards=shards, compressors=zarr_files.COMPRESSOR,
                         chunk_key_encoding=zarr_files.CHUNK_KEY_ENCODING, config={"write_empty_chunks": False})
    (tmp_path / "ours").mkdir()
    zarr_files.write_array(tmp_path / "ours" / "m", sparse, chunks)

    ours = files_under(tmp_path / "ours" / "m")
    assert ours == files_under(tmp_path / "zarr.zarr" / "m")
    assert sorted(ours) == (["c.0.0.0", "zarr.json"] if n_patches else ["zarr.json"])  # no chunk file when all 0
    np.testing.assert_array_equal(np.asarray(zarr_files.StoredArray(tmp_path / "ours" / "m")), dense)


def written_both_ways(tmp_path: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Every array of CASES written by write_array; and by zarr in several shards, some of them
    all fill value and so not stored (as CaseStore.create_banded's arrays come): name -> (path, data)."""
    by_zarr = zarr.open_group(tmp_path / "zarr.zarr", mode="w", zarr_format=3)
    zarr.open_group(tmp_path / "ours.zarr", mode="w", zarr_format=3)
    arrays = {}
    for name, (data, chunks, _) in CASES.items():
        zarr_files.write_array(tmp_path / "ours.zarr" / name, data, chunks)
        arrays[f"ours {name}"] = tmp_path / "ours.zarr" / name, data
    banded = smooth((3, 300, 200), "uint8")
    banded[:, 100:200] = 0  # the second band of rows: a shard file zarr does not write
    for name, chunks in [("bands", (3, 50, 64)), ("one class per chunk", (1, 50, 64))]:
        by_zarr.create_array(name, data=banded, chunks=chunks, shards=(3, 100, 256), compressors=zarr_files.COMPRESSOR,
                             chunk_key_encoding=zarr_files.CHUNK_KEY_ENCODING)
        arrays[f"zarr {name}"] = tmp_path / "zarr.zarr" / name, banded
    assert not (tmp_path / "zarr.zarr" / "bands" / "c.0.1.0").exists() and (tmp_path / "zarr.zarr" / "bands" / "c.0.2.0").exists()
    return arrays


def test_a_stored_array_reads_what_numpy_holds_for_any_integer_and_slice_key(tmp_path):
    rng = np.random.default_rng(2)

    def bound(n: int) -> int | None:  # anywhere, negative, past either end (numpy clips), or None
        return None if rng.random() < 0.1 else int(rng.integers(-n - 3, n + 3))

    for name, (path, data) in written_both_ways(tmp_path).items():
        stored = zarr_files.StoredArray(path)
        assert (stored.shape, stored.dtype, stored.ndim) == (data.shape, data.dtype, data.ndim), name
        np.testing.assert_array_equal(np.asarray(stored), data, err_msg=name)
        np.testing.assert_array_equal(stored[...], data, err_msg=name)
        for _ in range(60 if data.ndim else 0):
            key = tuple(int(rng.integers(-n, n)) if rng.random() < 0.25 else slice(bound(n), bound(n))
                        for n in data.shape[:int(rng.integers(1, data.ndim + 1))])
            read = stored[key]
            assert read.dtype == data.dtype
            np.testing.assert_array_equal(read, data[key], err_msg=f"{name} {key}")


@pytest.mark.parametrize("key", [(slice(None, None, 2),), (0, 0, 0, 0), (40,), (-41,), ([0, 1],), (True,), ("0",)])
def test_a_stored_array_refuses_other_keys(tmp_path, key):
    zarr_files.write_array(tmp_path / "a", np.ones((40, 30, 20), "uint8"), (16, 16, 16))
    with pytest.raises(IndexError, match=str(tmp_path / "a")):
        zarr_files.StoredArray(tmp_path / "a")[key]


def test_a_corrupt_or_truncated_shard_or_an_unknown_encoding_is_named(tmp_path):
    data = smooth((29, 300, 260), "uint8") > 120
    zarr_files.write_array(tmp_path / "a", data, (1, 128, 128))
    shard = tmp_path / "a" / "c.0.0.0"
    content = shard.read_bytes()
    shard.write_bytes(content[:-5] + bytes([content[-5] ^ 1]) + content[-4:])  # a bit of the index flipped
    with pytest.raises(StoreError, match=f"{shard}: corrupt shard"):
        zarr_files.StoredArray(tmp_path / "a")[...]
    shard.write_bytes(content[:100])
    with pytest.raises(StoreError, match=f"{shard}: truncated shard"):
        zarr_files.StoredArray(tmp_path / "a")[...]
    shard.write_bytes(content[:50] + bytes(50) + content[100:])  # the first chunk's bytes zeroed
    with pytest.raises(StoreError, match=f"{shard}: corrupt chunk"):
        zarr_files.StoredArray(tmp_path / "a")[...]
    zarr.create_array(tmp_path / "zstd", data=data, chunks=(29, 128, 128))  # zarr's defaults: zstd, "c/0/0/0"
    with pytest.raises(StoreError, match=f"{tmp_path / 'zstd'}: an array encoded as .*which segpipe does not write"):
        zarr_files.StoredArray(tmp_path / "zstd")


@pytest.mark.parametrize("cut", [15, 16, 2408, -1])
def test_a_cut_chunk_is_refused_not_read_past_its_end(tmp_path, cut):
    """Blosc is not given a chunk's length: without checking its header, a cut chunk decoded to
    wrong values with no error."""
    data = RNG.integers(0, 255, (3, 40, 40), dtype=np.uint8)
    zarr_files.write_array(tmp_path / "a", data, data.shape)
    chunk = tmp_path / "a" / "c.0.0.0"
    chunk.write_bytes(chunk.read_bytes()[:cut])
    with pytest.raises(StoreError, match=f"{chunk}: corrupt chunk"):
        zarr_files.StoredArray(tmp_path / "a")[...]


@pytest.mark.parametrize("metadata", [b"", b'{"shape": [3]', b'{"zarr_format": 3, "node_type": "group"}',
                                      b'{"shape": [3], "data_type": {"name": "x"}}'])
def test_metadata_that_is_not_an_arrays_is_named(tmp_path, metadata):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "zarr.json").write_bytes(metadata)
    with pytest.raises(StoreError, match=f"{tmp_path / 'a'}: not an array's metadata that segpipe can read"):
        zarr_files.StoredArray(tmp_path / "a")
