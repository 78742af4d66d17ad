"""The Zarr (v3) store: the one place that knows how cases, masks and predictions lie on disk.

Layout of a store `<name>.zarr`:
    attrs: {"dataset": str, "classes": [str, ...], plus whatever the writer adds (ingest params, skipped files)}
    <case_id>/                       one group per case
        attrs: case id, group id, source path, sha256, original size, kind ("image" | "video"), ...
        image   (H, W) or (H, W, 3) for an image, (T, H, W) for a video; uint8/uint16. A Kvasir
                image is its JPEG file as found, one chunk (segpipe.image_file)
        mask    (C, H, W) for an image, (T, C, H, W) for a video; uint8, one binary channel per class
        prob    same shape as mask, float16 probabilities (prediction stores)
        <other> any per-case array (e.g. frame timestamps, a video's reconstruction, pseudo-label confidence)

Every array is written in one go, chunked for partial reads and sharded (one shard file per
array; an array of one chunk is left unsharded, one file anyway) so a large dataset stays a few
files per case for DVC to hash; arrays filled piece by piece (predictions, ensembles) have one
file per band instead (CaseStore.create_banded). Masks are chunked one class per tile: a bone
covers a few of a hand's 16 tiles, and the chunks without a 1 are not stored, so ingest builds
and compresses ~15 MB of a hand's 121 MB mask instead of all of it. Probabilities, never exactly
0, keep all classes of a tile in one chunk.

Case groups and whole arrays are written by segpipe.zarr_files: the very files zarr writes, without
its per-call cost. Arrays filled band by band go through zarr. Masks, and the whole images that
training and inference load, are read through CaseStore.reader (zarr_files.StoredArray), several
times quicker than zarr, whose cost per chunk made a hand mask in 464 one-class chunks slower to
read than in 16 all-class ones, and which names the file of a chunk that does not decode; the rest
of the reading goes through zarr.
Compression is Blosc-LZ4 (level 0, no compression, for arrays it cannot shrink, such as X-rays)
and chunk keys are "c.0.0" (see zarr_files, which sets both).
"""
from __future__ import annotations

import asyncio
import functools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import _get_loop, sync

from segpipe import zarr_files
from segpipe.errors import StoreError
from segpipe.image_file import ImageFile
from segpipe.sparse_mask import SparseMask
from segpipe.zarr_files import CHUNK_KEY_ENCODING, COMPRESSOR, StoredArray

IMAGE, VIDEO = "image", "video"

# Cases read_labelled_cases reads at once. Every synchronous zarr call is a hop to zarr's event loop
# and its file threads, costing more than reading and decoding a Kvasir-sized image: one call at a
# time (13 a case), 40 cases took 0.28-0.40 s; issued together per case, 8 cases at a time, 0.10-0.13 s.
# Threads calling the synchronous API gained little (0.25-0.30 s).
CASES_IN_FLIGHT = 8


def default_chunks(name: str, shape: tuple[int, ...], kind: str, chunk: int, frames: int) -> tuple[int, ...]:
    """Chunks that let readers take a tile (images) or a run of frames (videos) cheaply."""
    if kind == VIDEO:
        return (min(frames, shape[0]),) + tuple(shape[1:])
    if name == "image":  # (H, W[, C]): spatial tiles, channels together
        return (_even_tile(shape[0], chunk), _even_tile(shape[1], chunk)) + tuple(shape[2:])
    # (C, H, W) and other per-class arrays: spatial tiles; one class per chunk for masks (see above)
    classes = (1,) if name == "mask" else tuple(shape[:-2])
    return classes + (_even_tile(shape[-2], chunk), _even_tile(shape[-1], chunk))


def _even_tile(size: int, chunk: int) -> int:
    """The tile side that splits `size` into as few tiles of at most `chunk` as possible, evenly:
    a 529-px Kvasir side in 265 + 264 rather than 512 + 17, whose edge chunk would be stored and
    read as 512 px of mostly padding (a whole Kvasir image read 19% faster, written 14%)."""
    return -(-size // -(-size // chunk))


class CaseStore:
    """Read and write one segpipe Zarr store."""

    def __init__(self, path: Path | str, mode: str = "r"):
        self.path, self.mode = Path(path), mode
        if mode == "r" and not (self.path / "zarr.json").exists():
            raise StoreError(f"{self.path}: not a Zarr store (no zarr.json)")

    @functools.cached_property
    def root(self) -> zarr.Group:
        """The root group, opened on first use: an ingest worker that only writes whole cases
        (through zarr_files) then never pays zarr's open, a round trip per case."""
        return zarr.open_group(str(self.path), mode=self.mode, zarr_format=3)

    @classmethod
    def create(cls, path: Path | str, dataset: str, classes: list[str], **attrs: Any) -> CaseStore:
        """An empty store at `path`, replacing whatever was there, with these root attrs (written by
        zarr_files: zarr took 5-6 ms to open a new store and set them)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        zarr_files.write_group(path, {"dataset": dataset, "classes": list(classes), **attrs})
        return cls(path, mode="r+")

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        """Replace the root attrs (the cases stay), in place: for a store still being built in its
        temporary folder (segpipe.atomic), as every writer builds one."""
        zarr_files.write_group_attrs(self.path, attrs)
        self.__dict__.pop("root", None)  # a root group opened before holds the old attrs

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
            raise StoreError(self._no_case(case_id)) from None

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        return self.case(case_id).attrs.asdict()

    def array(self, case_id: str, name: str) -> zarr.Array:
        try:
            return self.case(case_id)[name]
        except KeyError:
            raise StoreError(self._no_array(case_id, name)) from None

    def reader(self, case_id: str, name: str) -> StoredArray:
        """A reader of an array that decodes its files itself (zarr_files.StoredArray: several times
        quicker than zarr for whole arrays and bands, and for masks stored one class per chunk)."""
        path = self.path / case_id / name
        if not (path / zarr_files.METADATA).is_file():
            missing = self._no_array(case_id, name) if (self.path / case_id).is_dir() else self._no_case(case_id)
            raise StoreError(missing)
        return StoredArray(path)

    def has(self, case_id: str, name: str) -> bool:
        return case_id in self.root and name in self.root[case_id]

    def is_video(self, case_id: str) -> bool:
        return self.case_attrs(case_id).get("kind") == VIDEO

    def _no_case(self, case_id: str) -> str:
        return f"{self.path}: no case {case_id!r}"

    def _no_array(self, case_id: str, name: str) -> str:
        return f"{self.path}: case {case_id!r} has no {name!r} array"

    def write_case(self, case_id: str, attrs: dict[str, Any],
                   arrays: dict[str, np.ndarray | SparseMask | ImageFile] | None = None, chunk: int = 512,
                   frames: int = 16) -> None:
        """Create (or replace) a case group with its attrs and, where given, its whole arrays (see
        write_array)."""
        zarr_files.write_group(self.path / case_id, {"case_id": case_id, **attrs})
        for name, data in (arrays or {}).items():
            self._write_array(case_id, name, data, attrs.get("kind", IMAGE), chunk, frames)

    def link_case(self, source: CaseStore, case_id: str) -> None:
        """Add `source`'s case to this store by hard-linking its files (copying them only where the
        filesystem cannot link): no bytes rewritten. Safe because Zarr replaces a file to change it
        and never edits one in place, so neither store can alter what the other reads."""
        if case_id not in source.root:
            raise StoreError(source._no_case(case_id))
        shutil.copytree(source.path / case_id, self.path / case_id, copy_function=_link_or_copy)

    def link_array(self, source: CaseStore, case_id: str, name: str) -> None:
        """Add `source`'s array `name` to this store's case (written first) by hard-linking its files,
        as link_case does. The array must be one segpipe wrote (StoredArray reads it)."""
        source.reader(case_id, name)  # its StoreError when there is no such array
        shutil.copytree(source.path / case_id / name, self.path / case_id / name, copy_function=_link_or_copy)

    def write_array(
        self, case_id: str, name: str, data: np.ndarray, chunk: int = 512, frames: int = 16
    ) -> zarr.Array:
        """Write one whole array of a case, chunked and sharded as the layout prescribes."""
        self._write_array(case_id, name, data, self.case_attrs(case_id).get("kind", IMAGE), chunk, frames)
        return self.array(case_id, name)

    def _write_array(self, case_id: str, name: str, data: np.ndarray | SparseMask | ImageFile, kind: str,
                     chunk: int, frames: int) -> None:
        # One file: a shard for the whole array, or the one chunk where that is the whole array (a
        # shard's index and per-chunk work cost more than writing a small array itself).
        chunks = data.shape if isinstance(data, ImageFile) else default_chunks(name, data.shape, kind, chunk, frames)
        zarr_files.write_array(self.path / case_id / name, data, chunks)

    def create_banded(self, case_id: str, name: str, shape: tuple[int, ...], dtype: str, video: bool,
                      band: int) -> zarr.Array:
        """An empty array to fill band by band, one file per band: `band` frames of a (T, ...) video
        (one chunk, unsharded), or `band` rows of a (..., H, W) image (one shard of all channels, full
        width, in band x band chunks of all classes, or of one class for a mask, as default_chunks
        gives them). Writers of different bands never touch the same file, and a whole band is
        written without reading anything back."""
        chunks = default_chunks(name, shape, VIDEO if video else IMAGE, band, band)
        shards = None if video else tuple(shape[:-2]) + (chunks[-2], -(-shape[-1] // chunks[-1]) * chunks[-1])
        return self.case(case_id).create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                                               compressors=COMPRESSOR, fill_value=0, overwrite=True,
                                               chunk_key_encoding=CHUNK_KEY_ENCODING)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


class WritesBehind:
    """Writes into an array that run while the caller computes the next piece: into a Zarr array in
    zarr's own event loop and threads, at most one in flight (memory holds one piece more); into
    anything else (numpy) at once. Leaving the `with` block waits for the last write, and a write's
    error is raised by the next write or by leaving the block.

    Uses zarr's private loop (`_get_loop`, `_async_array`; zarr is pinned): the public API offers
    only blocking writes. Compressing a band while the model runs the next one saved 4-11% of
    tiled inference on 2 cores.
    """

    def __init__(self, array: Any):
        self.array, self.pending = array, None

    def __enter__(self) -> WritesBehind:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait()

    def write(self, selection: Any, value: np.ndarray) -> None:
        self.wait()
        if isinstance(self.array, zarr.Array):
            coroutine = self.array._async_array.setitem(selection, value)
            self.pending = asyncio.run_coroutine_threadsafe(coroutine, _get_loop())
        else:
            self.array[selection] = value

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()


def _kept_frames(keep: np.ndarray) -> np.ndarray:
    """Indices of the frames a `keep` array (one 0/1 per frame) marks as trusted."""
    return np.flatnonzero(keep)


def labelled_frames(labels: CaseStore, case_id: str) -> np.ndarray:
    """Indices of the frames of a case that carry a trusted label (all, unless a `keep` array says otherwise)."""
    if labels.has(case_id, "keep"):
        return _kept_frames(labels.array(case_id, "keep")[:])
    return np.arange(labels.array(case_id, "mask").shape[0] if labels.is_video(case_id) else 1)


def read_labelled_cases(
    images: CaseStore, labels: CaseStore, case_ids: list[str]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(frames, masks) of each case, stacked as frames_of does and cut to its labelled_frames; cases
    with none are left out. All zarr calls of CASES_IN_FLIGHT cases are issued together (see there),
    and their images and masks read (CaseStore.reader: it names the file of a chunk that does not
    decode, where zarr's codecs cannot) in threads meanwhile."""
    roots = images.root._async_group, labels.root._async_group  # the groups the stores already opened
    for start in range(0, len(case_ids), CASES_IN_FLIGHT):
        batch = case_ids[start : start + CASES_IN_FLIGHT]
        for frames, masks in sync(_gather(_read_labelled(images, labels, *roots, c) for c in batch)):
            if len(frames):
                yield frames, masks


async def _gather(coroutines: Iterator[Any]) -> list[Any]:
    """asyncio.gather inside zarr's event loop (sync() runs a coroutine there; a bare gather would
    bind to the caller's loop)."""
    return await asyncio.gather(*coroutines)


async def _read_labelled(
    images: CaseStore, labels: CaseStore, image_root: zarr.AsyncGroup, label_root: zarr.AsyncGroup, case_id: str
) -> tuple[np.ndarray, np.ndarray]:
    """One case of read_labelled_cases, with CaseStore's errors for what is missing."""
    image_case, label_case = await asyncio.gather(
        _member(image_root, case_id, images._no_case(case_id)), _member(label_root, case_id, labels._no_case(case_id))
    )
    image, mask = images.reader(case_id, "image"), labels.reader(case_id, "mask")  # their StoreErrors first
    frames, masks, keep = await asyncio.gather(
        asyncio.to_thread(np.asarray, image), asyncio.to_thread(np.asarray, mask), _read(label_case, "keep")
    )
    video = image_case.attrs.get("kind") == VIDEO
    frames, masks = frames_of(frames, video), frames_of(masks, video)
    if keep is None:
        return frames, masks
    kept = _kept_frames(keep)
    return frames[kept], masks[kept]


async def _member(group: zarr.AsyncGroup, name: str, missing: str | None = None) -> Any:
    """group[name]; when it is absent, None, or a StoreError saying `missing` where given."""
    try:
        return await group.getitem(name)
    except KeyError:
        if missing is None:
            return None
        raise StoreError(missing) from None


async def _read(case: zarr.AsyncGroup, name: str) -> np.ndarray | None:
    array = await _member(case, name)
    return None if array is None else np.asarray(await array.getitem(...))


def frames_of(array: np.ndarray, is_video: bool) -> np.ndarray:
    """View an image or mask as a stack of 2-D frames: images gain a leading frame axis of 1."""
    return array if is_video else array[None]
