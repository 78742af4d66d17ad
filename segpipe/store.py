"""The Zarr (v3) store: the one place that knows how cases, masks and predictions lie on disk.

Layout of a store `<name>.zarr`:
    attrs: {"dataset": str, "classes": [str, ...], plus whatever the writer adds (ingest params, skipped files)}
    <case_id>/                       one group per case
        attrs: case id, group id, source path, sha256, original size, kind ("image" | "video"), ...
        image   (H, W) or (H, W, 3) for an image, (T, H, W) for a video; uint8/uint16. A Kvasir image
                is its JPEG file's bytes, a 1-D uint8 array with attrs saying so (segpipe.encoded_image)
        mask    (C, H, W) for an image, (T, C, H, W) for a video; uint8, one binary channel per class
        prob    same shape as mask, float16 probabilities (prediction stores)
        <other> any per-case array (e.g. frame timestamps, a video's reconstruction, pseudo-label confidence)

Everything goes through zarr-python's public API, so every store opens with stock zarr. Chunks
follow what the stages read (docs/architecture.md has the measurements):
- an image in tiles of at most `chunk` px a side, so training crops and inference bands read only
  the tiles they cover; a video in runs of `frames` whole frames, as inference and ensembling read it;
- a mask one class per tile: a bone covers a few of a hand's tiles, and zarr stores no chunk
  without a 1 (write_empty_chunks=False), so a 121 MB hand mask is ~4 MB on disk;
- an array written in one go is one shard file (its chunks inside), so a case stays a few files for
  DVC to hash; an array filled band by band (predictions) has a shard per band (create_banded), so
  writers of different bands never touch one file and no shard is ever read back to be rewritten.
Compression is Blosc-LZ4: zstd took longer to compress a Kvasir case than to decode its JPEG.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from segpipe import encoded_image
from segpipe.encoded_image import EncodedImage
from segpipe.errors import StoreError

IMAGE, VIDEO = "image", "video"
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
# zarr's codec pipeline in Rust (the `zarrs` package), chosen through zarr's public config: it wrote a
# hand X-ray's case in a third of the CPU time of zarr's own pipeline and read it in half. One thread,
# because with several it lays a shard's chunks out in the order they finish, so the same data gave
# different files, and DVC different hashes. A pipeline or thread count set in the environment
# (ZARR_CODEC_PIPELINE__PATH, ZARR_THREADING__MAX_WORKERS) is the user's choice and is kept.
ZARRS = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline", "threading.max_workers": 1}
zarr.config.set({key: value for key, value in ZARRS.items()
                 if f"ZARR_{key.upper().replace('.', '__')}" not in os.environ})
# Cases read_labelled_cases reads at once, each in its own thread (zarr's synchronous API waits on
# file reads and decoding that release the GIL; one case at a time left both cores idle between them).
CASES_IN_FLIGHT = 8


def default_chunks(name: str, shape: tuple[int, ...], kind: str, chunk: int, frames: int) -> tuple[int, ...]:
    """Chunks that let readers take a tile (images) or a run of frames (videos) cheaply."""
    if kind == VIDEO:
        return (min(frames, shape[0]),) + tuple(shape[1:])
    if name == "image":  # (H, W[, C]): spatial tiles, channels together
        return (even_tile(shape[0], chunk), even_tile(shape[1], chunk)) + tuple(shape[2:])
    # (C, H, W) and other per-class arrays: spatial tiles; one class per chunk for masks (see above)
    classes = (1,) if name == "mask" else tuple(shape[:-2])
    return classes + (even_tile(shape[-2], chunk), even_tile(shape[-1], chunk))


def even_tile(size: int, chunk: int) -> int:
    """The tile side that splits `size` into as few tiles of at most `chunk` as possible, evenly:
    a 529-px Kvasir side in 265 + 264 rather than 512 + 17, whose edge chunk would be stored and
    read as 512 px of mostly padding."""
    return -(-size // -(-size // chunk))


def covering_shard(shape: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...] | None:
    """The one shard that holds every chunk of an array (a whole number of chunks per axis), or None
    where the array is a single chunk anyway."""
    if tuple(chunks) == tuple(shape):
        return None
    return tuple(-(-size // c) * c for size, c in zip(shape, chunks))


class CaseStore:
    """Read and write one segpipe Zarr store."""

    def __init__(self, path: Path | str, mode: str = "r"):
        self.path, self.mode = Path(path), mode
        if mode == "r" and not (self.path / "zarr.json").exists():
            raise StoreError(f"{self.path}: not a Zarr store (no zarr.json)")

    @cached_property
    def root(self) -> zarr.Group:
        try:
            return zarr.open_group(str(self.path), mode=self.mode, zarr_format=3)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise StoreError(f"{self.path}: not a readable Zarr v3 group ({exc})") from exc

    @classmethod
    def create(cls, path: Path | str, dataset: str, classes: list[str], **attrs: Any) -> CaseStore:
        """An empty store at `path`, replacing whatever was there, with these root attrs."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        zarr.create_group(str(path), overwrite=True, zarr_format=3,
                          attributes={"dataset": dataset, "classes": list(classes), **attrs})
        return cls(path, mode="r+")

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        """Replace the root attrs; the cases stay."""
        self.root.attrs.put(attrs)

    @property
    def attrs(self) -> dict[str, Any]:
        return self.root.attrs.asdict()

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    def case_ids(self) -> list[str]:
        return sorted(self.root.group_keys())

    def case(self, case_id: str) -> zarr.Group:
        try:
            return self.root[case_id]
        except KeyError:
            raise StoreError(f"{self.path}: no case {case_id!r}") from None

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        return self.case(case_id).attrs.asdict()

    def array(self, case_id: str, name: str) -> zarr.Array:
        case = self.case(case_id)
        try:
            return case[name]
        except KeyError:
            raise StoreError(f"{self.path}: case {case_id!r} has no {name!r} array") from None

    def read(self, case_id: str, name: str) -> np.ndarray:
        """The whole array; StoreError naming it where its files cannot be read or decoded."""
        array = self.array(case_id, name)
        try:
            return array[...]
        except (OSError, ValueError, RuntimeError) as exc:
            raise StoreError(f"{self.path / case_id / name}: cannot be read ({exc})") from exc

    def image(self, case_id: str) -> zarr.Array | np.ndarray:
        """A case's image as pixels: the zarr array itself, read where it is indexed, or for an image
        kept as its file (segpipe.encoded_image) the decoded pixels. StoreError naming the array where
        the file no longer decodes."""
        array = self.array(case_id, "image")
        encoding = array.attrs.get(encoded_image.ATTR)
        if encoding is None:
            return array
        try:
            return encoded_image.decode(self.read(case_id, "image").tobytes(), encoding)
        except ValueError as exc:
            raise StoreError(f"{self.path / case_id / 'image'}: a stored {encoding['format']} file that {exc}") from None

    def has(self, case_id: str, name: str) -> bool:
        return case_id in self.root and name in self.root[case_id]

    def is_video(self, case_id: str) -> bool:
        return self.case_attrs(case_id).get("kind") == VIDEO

    def write_case(self, case_id: str, attrs: dict[str, Any],
                   arrays: dict[str, np.ndarray | EncodedImage] | None = None, chunk: int = 512,
                   frames: int = 16) -> None:
        """Create (or replace) a case group with its attrs and, where given, its whole arrays (see
        write_array)."""
        self.root.create_group(case_id, overwrite=True, attributes={"case_id": case_id, **attrs})
        kind = attrs.get("kind", IMAGE)
        for name, data in (arrays or {}).items():
            self._write_array(case_id, name, data, kind, chunk, frames)

    def write_array(self, case_id: str, name: str, data: np.ndarray | EncodedImage, chunk: int = 512,
                    frames: int = 16) -> zarr.Array:
        """Write one whole array of a case, chunked and sharded as the layout prescribes."""
        self._write_array(case_id, name, data, self.case_attrs(case_id).get("kind", IMAGE), chunk, frames)
        return self.array(case_id, name)

    def _write_array(self, case_id: str, name: str, data: np.ndarray | EncodedImage, kind: str,
                     chunk: int, frames: int) -> None:
        group = self.case(case_id)
        if isinstance(data, EncodedImage):  # the file's bytes, one chunk (they do not compress)
            content = np.frombuffer(data.content, dtype=np.uint8)
            group.create_array(name, data=content, chunks=content.shape, compressors=None, overwrite=True,
                               attributes={encoded_image.ATTR: data.attrs()})
            return
        chunks = default_chunks(name, data.shape, kind, chunk, frames)
        group.create_array(name, data=data, chunks=chunks, shards=covering_shard(data.shape, chunks),
                           compressors=COMPRESSOR, overwrite=True)

    def link_case(self, source: CaseStore, case_id: str) -> None:
        """Add `source`'s case to this store by hard-linking its files (copying them only where the
        filesystem cannot link): no bytes rewritten. Safe because zarr replaces a file to change it
        and never edits one in place, so neither store can alter what the other reads."""
        source.case(case_id)  # its StoreError when there is no such case
        shutil.copytree(source.path / case_id, self.path / case_id, copy_function=_link_or_copy)

    def link_array(self, source: CaseStore, case_id: str, name: str) -> None:
        """Add `source`'s array `name` to this store's case (written first) by hard-linking its files,
        as link_case does."""
        source.array(case_id, name)  # its StoreError when there is no such array
        shutil.copytree(source.path / case_id / name, self.path / case_id / name, copy_function=_link_or_copy)

    def create_banded(self, case_id: str, name: str, shape: tuple[int, ...], dtype: str, video: bool,
                      band: int) -> zarr.Array:
        """An empty array to fill band by band, a shard per band: `band` frames of a (T, ...) video
        (one chunk), or `band` rows of a (..., H, W) image (full width, in band x band chunks of all
        classes, or of one class for a mask, as default_chunks gives them). Writers of different
        bands never touch the same file, and a whole band is written without reading anything back."""
        chunks = default_chunks(name, shape, VIDEO if video else IMAGE, band, band)
        shards = None if video else tuple(shape[:-2]) + (chunks[-2], -(-shape[-1] // chunks[-1]) * chunks[-1])
        return self.case(case_id).create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                                               compressors=COMPRESSOR, fill_value=0, overwrite=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


class WritesBehind:
    """Writes into an array that run in a thread while the caller computes the next piece, at most
    one in flight (memory holds one piece more). Leaving the `with` block waits for the last write,
    and a write's error is raised by the next write or by leaving the block.

    Why: compressing a band of probabilities while the model runs the next one saved 4-11% of tiled
    inference on 2 cores (compression and zarr's file writes release the GIL)."""

    def __init__(self, array: Any):
        self.array, self.pending = array, None
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writes-behind")

    def __enter__(self) -> WritesBehind:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.wait()
        finally:
            self.thread.shutdown()

    def write(self, selection: Any, value: np.ndarray) -> None:
        self.wait()
        self.pending = self.thread.submit(self.array.__setitem__, selection, value)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()


def labelled_frames(labels: CaseStore, case_id: str) -> np.ndarray:
    """Indices of the frames of a case that carry a trusted label (all, unless a `keep` array says otherwise)."""
    if labels.has(case_id, "keep"):
        return np.flatnonzero(labels.read(case_id, "keep"))
    return np.arange(labels.array(case_id, "mask").shape[0] if labels.is_video(case_id) else 1)


def read_labelled_cases(
    images: CaseStore, labels: CaseStore, case_ids: list[str]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(frames, masks) of each case, stacked as frames_of does and cut to its labelled_frames; cases
    with none are left out. CASES_IN_FLIGHT cases are read at a time, each in a thread."""
    with ThreadPoolExecutor(max_workers=CASES_IN_FLIGHT, thread_name_prefix="read-cases") as threads:
        for start in range(0, len(case_ids), CASES_IN_FLIGHT):
            batch: list[Future] = [threads.submit(_read_labelled, images, labels, case_id)
                                   for case_id in case_ids[start : start + CASES_IN_FLIGHT]]
            for future in batch:
                frames, masks = future.result()
                if len(frames):
                    yield frames, masks


def _read_labelled(images: CaseStore, labels: CaseStore, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    video = images.is_video(case_id)
    frames = frames_of(np.asarray(images.image(case_id)), video)
    masks = frames_of(labels.read(case_id, "mask"), video)
    if not labels.has(case_id, "keep"):
        return frames, masks
    kept = labelled_frames(labels, case_id)
    return frames[kept], masks[kept]


def frames_of(array: np.ndarray, is_video: bool) -> np.ndarray:
    """View an image or mask as a stack of 2-D frames: images gain a leading frame axis of 1."""
    return array if is_video else array[None]
