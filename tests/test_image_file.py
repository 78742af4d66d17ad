"""segpipe.image_file: an image stored as its file reads back exactly as PIL decodes the file, through
zarr (with or without segpipe imported) and StoredArray; a file that does not decode is refused
by name, as a full decode would refuse it."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from segpipe import zarr_files
from segpipe.errors import IngestError, StoreError
from segpipe.image_file import ImageFile, ImageFileCodec
from segpipe.store import CaseStore, read_labelled_cases

RNG = np.random.default_rng(0)


def photo(height: int = 75, width: int = 90) -> np.ndarray:
    """Smooth colour content with some noise: what a JPEG encoder meets in an endoscopy frame."""
    y, x = np.mgrid[:height, :width]
    image = np.stack([x * 2, y * 3, (x + y) % 200], axis=-1) + RNG.integers(0, 20, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def encoded(pixels: np.ndarray, fmt: str, mode: str | None = None, **options) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


FILES = {  # name: the file's bytes
    "baseline jpeg 4:2:0": lambda: encoded(photo(), "JPEG", quality=80),
    "progressive jpeg": lambda: encoded(photo(), "JPEG", progressive=True),
    "grayscale jpeg": lambda: encoded(photo()[..., 0], "JPEG"),
    "cmyk jpeg": lambda: encoded(photo(), "JPEG", mode="CMYK"),
    "rgba png": lambda: encoded(np.dstack([photo(), photo()[..., :1]]), "PNG"),
}


def decoded_by_pil(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("name", FILES)
def test_an_image_file_is_stored_as_its_bytes_and_reads_back_as_pil_decodes_it(tmp_path, name):
    source = tmp_path / "image.file"
    source.write_bytes(FILES[name]())
    image = ImageFile.read(source, "RGB")
    assert image.shape == (75, 90, 3) and image.dtype == np.uint8 and image.content == source.read_bytes()
    expected = decoded_by_pil(source)
    zarr_files.write_array(tmp_path / "a", image, image.shape)
    assert (tmp_path / "a" / "c.0.0.0").read_bytes() == source.read_bytes()
    through_zarr = zarr.open_array(tmp_path / "a", mode="r")
    np.testing.assert_array_equal(through_zarr[...], expected)
    np.testing.assert_array_equal(through_zarr[10:20, 30:], expected[10:20, 30:])
    np.testing.assert_array_equal(zarr_files.StoredArray(tmp_path / "a")[5:9, 3], expected[5:9, 3])
    np.testing.assert_array_equal(np.asarray(image), expected)


@pytest.mark.parametrize("mode, shape", [("RGB", (529, 622, 3)), ("RGB", (40, 60, 3)), ("L", (33, 20))])
def test_the_metadata_is_what_zarr_writes_for_an_array_with_the_codec(tmp_path, mode, shape):
    """The document is a cached one with this array's shapes put in: each size and mode must come
    out as zarr itself would write it."""
    image = ImageFile(b"unused", shape, mode)
    zarr_files.write_array(tmp_path / "ours", image, shape)
    zarr.create_array(tmp_path / "zarr", shape=shape, dtype="uint8", chunks=shape, fill_value=0,
                      serializer=ImageFileCodec(mode=mode), compressors=None, filters=None,
                      chunk_key_encoding=zarr_files.CHUNK_KEY_ENCODING)
    assert (tmp_path / "ours" / "zarr.json").read_bytes() == (tmp_path / "zarr" / "zarr.json").read_bytes()


def test_an_array_of_the_codec_must_be_one_uint8_chunk_shaped_for_its_mode(tmp_path):
    for shape, chunks, dtype, mode, problem in [((40, 60, 3), (20, 60, 3), "uint8", "RGB", "one chunk"),
                                                ((40, 60, 3), (40, 60, 3), "uint16", "RGB", "holds uint8"),
                                                ((40, 60), (40, 60), "uint8", "RGB", "shape .* mode RGB"),
                                                ((40,), (40,), "uint8", "L", "shape .* mode L"),
                                                ((40, 60), (40, 60), "uint8", "1", "mode 1 does not decode to uint8"),
                                                ((40, 60), (40, 60), "uint8", "I;16", "does not decode to uint8")]:
        with pytest.raises(ValueError, match=problem):
            zarr.create_array(tmp_path / problem, shape=shape, dtype=dtype, chunks=chunks, compressors=None,
                              serializer=ImageFileCodec(mode=mode), filters=None)


def test_training_reads_name_the_image_file_that_no_longer_decodes(tmp_path):
    source = tmp_path / "image.jpg"
    source.write_bytes(FILES["baseline jpeg 4:2:0"]())
    store = CaseStore.create(tmp_path / "s.zarr", dataset="kvasir", classes=["polyp"])
    store.write_case("case7", {"kind": "image"}, {"image": ImageFile.read(source, "RGB"),
                                                  "mask": np.ones((1, 75, 90), np.uint8)})
    [(frames, masks)] = read_labelled_cases(store, store, ["case7"])
    np.testing.assert_array_equal(frames[0], decoded_by_pil(source))
    chunk = store.path / "case7" / "image" / "c.0.0.0"
    chunk.write_bytes(source.read_bytes()[:300])
    with pytest.raises(StoreError, match=f"{chunk}: an image-file chunk that does not decode"):
        list(read_labelled_cases(store, store, ["case7"]))


def test_writing_through_zarr_is_refused(tmp_path):
    source = tmp_path / "image.jpg"
    source.write_bytes(FILES["baseline jpeg 4:2:0"]())
    zarr_files.write_array(tmp_path / "a", ImageFile.read(source, "RGB"), (75, 90, 3))
    with pytest.raises(StoreError, match="cannot be written through zarr"):
        zarr.open_array(tmp_path / "a", mode="r+")[0, 0] = 1
    assert (tmp_path / "a" / "c.0.0.0").read_bytes() == source.read_bytes()


def full_decode_fails(path: Path) -> bool:
    try:
        Image.open(path).load()
    except OSError:
        return True
    return False


@pytest.mark.parametrize("name", ["baseline jpeg 4:2:0", "progressive jpeg", "rgba png"])
def test_a_cut_file_is_refused_by_name_exactly_where_a_full_decode_fails(tmp_path, name):
    """Ingest decodes a JPEG at 1/8 scale to prove it whole: every cut that a full decode refuses
    must be refused, and nothing it accepts."""
    content = FILES[name]()
    refused, cuts = 0, [2, 10, 100, *range(200, len(content), max(1, len(content) // 40)), len(content) - 2]
    for cut in cuts:
        path = tmp_path / f"cut{cut}"
        path.write_bytes(content[:cut])
        if full_decode_fails(path):
            refused += 1
            with pytest.raises(IngestError, match=f"{path}: corrupt or truncated image"):
                ImageFile.read(path, "RGB")
        else:
            ImageFile.read(path, "RGB")
    assert refused >= len(cuts) - 1  # every cut but, in the PNG, one inside its end marker's checksum


def test_a_stored_image_file_that_no_longer_decodes_as_its_array_is_named(tmp_path):
    source = tmp_path / "image.jpg"
    source.write_bytes(FILES["baseline jpeg 4:2:0"]())
    zarr_files.write_array(tmp_path / "a", ImageFile.read(source, "RGB"), (75, 90, 3))
    chunk = tmp_path / "a" / "c.0.0.0"
    chunk.write_bytes(source.read_bytes()[:500])
    with pytest.raises(StoreError, match=f"{chunk}: an image-file chunk that does not decode"):
        zarr_files.StoredArray(tmp_path / "a")[...]
    chunk.write_bytes(encoded(photo(75, 91), "JPEG"))
    wrong_size = r"decodes to \(75, 91, 3\) uint8 .* not the array's \(75, 90, 3\)"
    with pytest.raises(StoreError, match=f"{chunk}: .*{wrong_size}"):
        zarr_files.StoredArray(tmp_path / "a")[...]
    with pytest.raises(StoreError, match=wrong_size):
        zarr.open_array(tmp_path / "a", mode="r")[...]


def test_zarr_reads_the_array_without_segpipe_imported_through_the_codec_entry_point(tmp_path):
    source = tmp_path / "image.jpg"
    source.write_bytes(FILES["baseline jpeg 4:2:0"]())
    zarr_files.write_array(tmp_path / "a", ImageFile.read(source, "RGB"), (75, 90, 3))
    script = ("import sys, zarr; assert 'segpipe' not in sys.modules; "
              "a = zarr.open_array(sys.argv[1], mode='r'); print(int(a[...].astype('int64').sum()))")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "a")], capture_output=True, text=True,
                            check=True)
    assert int(result.stdout) == int(decoded_by_pil(source).astype(np.int64).sum())
