"""Typed configuration: one model per params.yaml section, validated once when loaded.

The library takes these models (or the plain values in them); only `tasks/` reads params.yaml.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from segpipe.errors import ConfigError

DATASET_NAMES = ("kvasir", "usc_timit", "hand_xray")


class Section(BaseModel):
    # Unknown keys are errors: a typo in params.yaml must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(Section):
    raw: Path
    in_channels: Literal[1, 3]
    image_size: tuple[int, int] = Field(description="the scale the model sees: (H, W)")
    labels: Literal["ingest", "pseudolabel"] = "ingest"
    truth: Path | None = Field(None, description="true masks kept aside (demo only), to score against")
    tile_scale: float | None = Field(
        None, gt=0, le=1,
        description="None: each whole image/frame is resized to image_size (small images). A number: the model "
        "sees the image at this scale in image_size tiles: trained on random crops, predicted by sliding window "
        "over the full-resolution image read tile by tile from Zarr (large images)",
    )

    def tile_extent(self) -> tuple[int, int] | None:
        """The full-resolution extent (H, W) one model tile covers, or None when whole images are resized."""
        if self.tile_scale is None:
            return None
        return tuple(round(s / self.tile_scale) for s in self.image_size)


class KvasirDemo(Section):
    n_cases: int = Field(ge=4)
    min_size: int = Field(ge=64)
    max_size: int = Field(ge=64)


class UscTimitDemo(Section):
    n_speakers: int = Field(ge=2)
    videos_per_speaker: int = Field(ge=1)
    n_frames: int = Field(ge=8)
    warmup_frames: int = Field(ge=0)
    size: int = Field(ge=32)
    fps: float = Field(gt=0)


class HandXrayDemo(Section):
    n_patients: int = Field(ge=2)
    n_test_patients: int = Field(ge=0)
    size: int = Field(ge=256)


class DemoConfig(Section):
    seed: int = 0
    kvasir: KvasirDemo
    usc_timit: UscTimitDemo
    hand_xray: HandXrayDemo


class IngestConfig(Section):
    on_error: Literal["fail", "skip"] = "fail"
    chunk: int = Field(512, ge=16, description="spatial chunk edge of large images")
    video_chunk_frames: int = Field(16, ge=1)


class DaskConfig(Section):
    scheduler: str | None = Field(None, description="address of a running Dask scheduler; None: a LocalCluster")
    n_workers: int = Field(2, ge=1, description="LocalCluster workers (ignored with a scheduler address)")
    threads_per_worker: int = Field(1, ge=1)


class PseudolabelConfig(Section):
    smooth_frames: int = Field(3, ge=1, description="odd temporal median window")
    min_confidence: float = Field(0.5, ge=0, le=1)


class SplitConfig(Section):
    k: int = Field(ge=2)
    seed: int = 0
    test_fraction: float = Field(gt=0, lt=1)


class TrainOverrides(Section):
    epochs: int | None = None
    steps_per_epoch: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    patience: int | None = None
    hflip: bool | None = None


class TrainConfig(Section):
    archs: tuple[str, ...]
    folds: tuple[int, ...]
    epochs: int = Field(ge=1)
    steps_per_epoch: int = Field(ge=1, description="batches per epoch; validation runs after each epoch")
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(ge=1, description="epochs without a better validation Dice before stopping")
    loss: str = "bce_dice"
    hflip: bool = Field(False, description="mirror half of the training samples left-right")
    channels: tuple[int, ...] = (16, 32, 64, 128)
    seed: int = 0
    per_dataset: dict[str, TrainOverrides] = {}

    def for_dataset(self, dataset: str) -> TrainConfig:
        """This config with the dataset's overrides applied."""
        override = self.per_dataset.get(dataset)
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))


class InferConfig(Section):
    overlap: float = Field(0.25, ge=0, lt=1)
    mode: Literal["gaussian", "constant"] = "gaussian"
    batch_size: int = Field(4, ge=1)


class EnsembleConfig(Section):
    threshold: float = Field(0.5, gt=0, lt=1)


class Params(Section):
    device: str = "auto"
    dask: DaskConfig = DaskConfig()
    datasets: dict[str, DatasetConfig]
    demo: DemoConfig
    ingest: IngestConfig
    pseudolabel: PseudolabelConfig
    split: SplitConfig
    train: TrainConfig
    infer: InferConfig
    ensemble: EnsembleConfig

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        unknown = set(self.datasets) - set(DATASET_NAMES)
        if unknown:
            raise ValueError(f"datasets: unknown dataset(s) {sorted(unknown)}; known: {DATASET_NAMES}")
        if sorted(self.train.folds) != list(range(self.split.k)):
            raise ValueError(
                f"train.folds {list(self.train.folds)} must list every fold 0..split.k-1 (split.k={self.split.k})"
            )
        unknown = set(self.train.per_dataset) - set(self.datasets)
        if unknown:
            raise ValueError(f"train.per_dataset: unknown dataset(s) {sorted(unknown)}")
        return self

    def dataset(self, name: str) -> DatasetConfig:
        if name not in self.datasets:
            raise ConfigError(f"datasets.{name}: not configured; configured: {sorted(self.datasets)}")
        return self.datasets[name]


def load_params(path: Path | str) -> Params:
    """Read and validate params.yaml; errors name the file and the offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc
