"""What an exported MONAI bundle runs: every image or video file of a folder through each member of
the trained ensemble (TorchScript), their weighted mean, and the per-class thresholds; one .npz of
`prob` (float16) and `mask` (uint8) per input file. segpipe.export writes the bundle, whose
configs/inference.json builds an `Ensemble` and calls its `run`.

Portable, as segpipe.infer_core (see there): it imports nothing of segpipe, and segpipe.export
copies it with the modules it imports into the bundle's scripts/ package, so that a bundle computes
what segpipe's infer and ensemble stages compute, op for op, where segpipe is not installed.

Files are decoded to the pixels segpipe's ingest stores (segpipe.datasets), by the reader the
export names:
    rgb    an image as 8-bit RGB (Kvasir); a 16-bit file scaled exactly, v * 255 / 65535 rounded
    grey   a grey image, kept at 16 bits when the file has them (hand X-rays); colour as its luma
    video  each frame's luma plane as coded, full range (USC rtMRI)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from av.video.reformatter import ColorRange
from PIL import Image

from .ensemble_core import cut, weighted_mean
from .infer_core import predict_frames, predict_tiled
from .tiling import even_tile, row_bands

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".avi", ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv"}
SUFFIXES = {"rgb": {".jpg", ".jpeg", ".png"}, "grey": {".png"}, "video": VIDEO_SUFFIXES}


def _wide(image: Image.Image) -> np.ndarray | None:
    """The pixels of a 16-bit image (PIL's "I;16*", or "I" holding 16-bit values) as int64, else None."""
    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return None
    wide = np.asarray(image).astype(np.int64)
    if wide.size and (wide.min() < 0 or wide.max() > 65535):
        raise ValueError(f"pixel values {wide.min()}..{wide.max()} do not fit 16 bits")
    return wide


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        wide = _wide(image)
        if wide is not None:
            image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
        # np.array, not asarray: PIL's buffer is read-only, and torch warns of every read-only array it takes.
        return np.array(image if image.mode == "RGB" else image.convert("RGB"))


def read_grey(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        wide = _wide(image)
        return wide.astype(np.uint16) if wide is not None else np.array(image.convert("L"))


def read_video(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        frames = [frame.reformat(format="gray", src_color_range=ColorRange.JPEG,
                                 dst_color_range=ColorRange.JPEG).to_ndarray()
                  for frame in container.decode(container.streams.video[0])]
    if not frames:
        raise ValueError(f"{path}: no decodable frames")
    return np.stack(frames)


READERS = {"rgb": read_rgb, "grey": read_grey, "video": read_video}


@dataclass(frozen=True)
class Settings:
    """What inference takes of segpipe's InferConfig, resolved by the export (test-time flips as planned)."""

    batch_size: int
    overlap: float
    mode: str
    flips: list[list[int]]
    band_rows: int

    def tta_flips(self) -> list[tuple[int, ...]]:
        return [tuple(dims) for dims in self.flips]


@dataclass
class Member:
    """One trained model of the ensemble: its TorchScript module, checkpoint meta and weight."""

    name: str
    model: torch.jit.ScriptModule
    meta: dict[str, Any]
    weight: float
    extent: tuple[int, int] | None  # image pixels one tile covers; None: whole images


class Ensemble:
    """The members, their weights and the per-class thresholds, as configs/inference.json gives them."""

    def __init__(self, bundle_root: str, members: list[dict[str, Any]], classes: list[str],
                 thresholds: list[float], inference: dict[str, Any], reader: str, chunk: int,
                 device: str = "cpu", threads: int = 1):
        # The pipeline predicts on Dask workers, which Dask starts with OMP_NUM_THREADS=1, and some
        # of torch's CPU kernels (convolutions, antialiased resizing) round differently with more
        # threads: one thread gives its probabilities bit for bit, more may move a few by a step.
        torch.set_num_threads(threads)
        root, self.device = Path(bundle_root), torch.device(device)
        self.members = [
            Member(m["name"], torch.jit.load(str(root / m["torchscript"]), map_location=self.device).eval(),
                   m["meta"], float(m["weight"]), tuple(m["tile_extent"]) if m["tile_extent"] else None)
            for m in members
        ]
        self.classes, self.thresholds = list(classes), [float(t) for t in thresholds]
        self.settings, self.reader, self.chunk = Settings(**inference), reader, chunk

    def member_probabilities(self, member: Member, pixels: np.ndarray, video: bool) -> np.ndarray:
        """(K, H, W), or (T, K, H, W) for a video, float16: what segpipe's infer stage writes."""
        if member.extent is None:
            probs = predict_frames(member.model, pixels if video else pixels[None], member.meta, self.settings,
                                   self.device)
            return probs if video else probs[0]
        out = np.empty((len(member.meta["classes"]),) + pixels.shape[:2], dtype=np.float16)

        def write(r0: int, r1: int, probs: np.ndarray) -> None:
            out[:, r0:r1] = probs

        # The infer stage's bands and chunk rows (the ingest store's): the same tiles in the same batches.
        chunk = even_tile(pixels.shape[0], self.chunk)
        for rows in row_bands(pixels.shape[0], chunk, self.settings.band_rows):
            predict_tiled(member.model, member.meta, member.extent, pixels, write, self.settings, self.device,
                          rows, chunk)
        return out

    def predict(self, pixels: np.ndarray, video: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The ensemble's float16 probabilities and uint8 masks of one image (H, W[, C]) or video (T, H, W)."""
        parts = (self.member_probabilities(m, pixels, video) for m in self.members)
        prob = weighted_mean(parts, [m.weight for m in self.members])
        return prob, cut(prob, self.thresholds)

    def inputs(self, folder: Path) -> list[Path]:
        """The files of `folder` this bundle reads, sorted; others (dotfiles, other suffixes) are logged and left."""
        found = []
        for path in sorted(Path(folder).iterdir()):
            if path.is_file() and path.suffix.lower() in SUFFIXES[self.reader]:
                found.append(path)
            elif not path.name.startswith("."):
                log.warning("%s: not a %s input (%s), left out", path, self.reader, sorted(SUFFIXES[self.reader]))
        if not found:
            raise FileNotFoundError(f"{folder}: no input files ({sorted(SUFFIXES[self.reader])})")
        stems = [path.stem for path in found]
        twice = sorted({stem for stem in stems if stems.count(stem) > 1})
        if twice:  # each writes <stem>.npz
            raise ValueError(f"{folder}: several files named {twice[0]!r} (other suffixes): rename one")
        return found

    def run(self, input_dir: str, output_dir: str) -> list[str]:
        """Predict every input file of `input_dir` into `output_dir`/<file stem>.npz; return the stems."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        done = []
        for path in self.inputs(Path(input_dir)):
            prob, mask = self.predict(READERS[self.reader](path), video=self.reader == "video")
            np.savez_compressed(out / f"{path.stem}.npz", prob=prob, mask=mask, classes=np.array(self.classes))
            log.info("%s -> %s", path.name, out / f"{path.stem}.npz")
            done.append(path.stem)
        return done
