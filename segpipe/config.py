"""Typed configuration: one model per params.yaml section, validated once when loaded.

The library takes these models (or the plain values in them); only `tasks/` reads params.yaml.
"""
from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, model_validator

from segpipe.errors import ConfigError

DATASET_NAMES = ("kvasir", "usc_timit", "hand_xray")


class Section(BaseModel):
    # Unknown keys are errors: a typo in params.yaml must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)

    def explicit(self, name: str) -> bool:
        """Whether params.yaml sets `name` (to anything but null), so that it wins over the plan."""
        return name in self.model_fields_set and getattr(self, name) is not None


def tile_extent(image_size: tuple[int, int], tile_scale: float | None) -> tuple[int, int] | None:
    """The full-resolution extent (H, W) one model tile covers, or None when whole images are resized."""
    if tile_scale is None:
        return None
    return tuple(round(s / tile_scale) for s in image_size)


class DatasetConfig(Section):
    raw: Path
    in_channels: Literal[1, 3]
    image_size: tuple[int, int] | None = Field(
        None, description="the scale the model sees: (H, W); None: planned (segpipe/plan.py)"
    )
    labels: Literal["ingest", "pseudolabel"] = "ingest"
    truth: Path | None = Field(None, description="true masks kept aside (demo only), to score against")
    tile_scale: float | None = Field(
        None, gt=0, le=1,
        description="left out: planned. None: each whole image/frame is resized to image_size (small images). "
        "A number: the model sees the image at this scale in image_size tiles: trained on random crops, predicted by sliding window "
        "over the full-resolution image read tile by tile from Zarr (large images)",
    )

    def tile_extent(self) -> tuple[int, int] | None:
        return tile_extent(self.image_size, self.tile_scale)

    def explicit(self, name: str) -> bool:
        """As Section.explicit, but `tile_scale: null` is explicit too: whole images, whatever the plan."""
        return name in self.model_fields_set if name == "tile_scale" else super().explicit(name)


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
    max_in_flight: int | None = Field(
        None, ge=1, description="tasks queued or running at once (a task ingests one case or several small ones, "
        "see segpipe.ingest.task_batches); None: 4 per Dask worker thread (a queued task holds no pixels: "
        "memory holds one case per thread)",
    )


class DaskConfig(Section):
    scheduler: str | None = Field(None, description="address of a running Dask scheduler; None: a LocalCluster")
    n_workers: int = Field(2, ge=1, description="LocalCluster workers (ignored with a scheduler address)")
    threads_per_worker: int = Field(1, ge=1)


class StudentConfig(Section):
    """The student of a teacher-student round (segpipe/teacher.py): its own settings, apart from
    `train:`, so that tuning the final models never reruns the labels."""

    arch: str = "unet"
    image_size: list[int] = Field([64, 64], description="the student's input (H, W)")
    channels: list[int] = Field([16, 32, 64, 128], description="a list (not a tuple) to round-trip through store attrs")
    epochs: int = Field(20, ge=1)
    steps_per_epoch: int = Field(40, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.005, gt=0)
    patience: int = Field(5, ge=1, description="epochs without a better validation Dice before stopping")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of groups (speakers) held out for early stopping")
    seed: int = 0

    def train_config(self) -> TrainConfig:
        """The TrainConfig of segpipe.train.fit, built field by field; the rest are TrainConfig's defaults."""
        return TrainConfig(
            archs=(self.arch,), folds=(0,), epochs=self.epochs, steps_per_epoch=self.steps_per_epoch,
            batch_size=self.batch_size, lr=self.lr, patience=self.patience, channels=tuple(self.channels),
            res_units=1, loss="bce_dice", foreground_fraction=0.0, seed=self.seed,
        )


class PseudolabelConfig(Section):
    smooth_frames: int = Field(3, ge=1, description="odd temporal median window")
    min_confidence: float = Field(0.5, ge=0, le=1)
    rounds: int = Field(
        0, ge=0, description="teacher-student rounds after the classical labels (0: classical labels only)"
    )
    student: StudentConfig = StudentConfig()


class SplitConfig(Section):
    k: int = Field(ge=2)
    seed: int = 0
    test_fraction: float = Field(gt=0, lt=1)
    stratify: dict[Literal[DATASET_NAMES], Literal["none", "mask_area", "class_count"]] = Field(
        {}, description="per dataset, what each fold and the test set get their share of (default none): "
        "mask_area: bins of the foreground fraction (polyp size); class_count: classes present",
    )
    area_bins: int = Field(3, ge=2, description="quantile bins of mask_area (3: tertiles)")
    test_list: dict[Literal[DATASET_NAMES], Path] = Field(
        {}, description="per dataset, a file of case ids, one a line: exactly the test set (with the rest of "
        "their groups), instead of test_fraction; e.g. an official test split",
    )

    def stratify_for(self, dataset: str) -> str:
        return self.stratify.get(dataset, "none")


class TrainOverrides(Section):
    epochs: int | None = None
    steps_per_epoch: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    patience: int | None = None
    foreground_fraction: float | None = None
    channels: tuple[int, ...] | None = None
    res_units: int | None = None
    loss: str | None = None


class LossConfig(Section):
    """Options of the losses in segpipe/losses.py; each loss reads only its own."""

    bce_weight: float = Field(0.5, ge=0, description="bce_dice: weight of the BCE term")
    dice_weight: float = Field(0.5, ge=0, description="bce_dice, dice_focal: weight of the soft Dice term")
    focal_weight: float = Field(0.5, ge=0, description="dice_focal: weight of the focal term")
    focal_gamma: float = Field(2.0, ge=0, description="dice_focal: focusing exponent of the focal term")
    tversky_alpha: float = Field(0.3, ge=0, description="tversky, focal_tversky: weight of false positives")
    tversky_beta: float = Field(0.7, ge=0, description="tversky, focal_tversky: weight of false negatives")
    tversky_gamma: float = Field(0.75, gt=0, description="focal_tversky: exponent of (1 - Tversky index)")
    border_w0: float = Field(10.0, ge=0, description="unet_weighted: peak weight of gaps between objects")
    border_sigma: float = Field(5.0, gt=0, description="unet_weighted: width in pixels of that border weight")


class TrainConfig(Section):
    archs: tuple[str, ...]
    folds: tuple[int, ...]
    epochs: int = Field(20, ge=1, description="unless set: planned from the time budget")
    steps_per_epoch: int = Field(ge=1, description="batches per epoch; validation runs after each epoch")
    batch_size: int = Field(8, ge=1, description="unless set: planned from the memory budget")
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(6, ge=1, description="epochs without a better validation Dice before stopping")
    loss: str = Field("bce_dice", description="unless set: planned")
    loss_options: LossConfig = LossConfig()
    optimizer: Literal["adam", "adamw"] = "adamw"
    schedule: Literal["cosine", "poly"] = Field("cosine", description="learning rate per epoch, from lr down to 0")
    poly_power: float = Field(0.9, gt=0, description="poly: lr * (1 - epoch / epochs) ** poly_power")
    top_k: int = Field(1, ge=1, description="best epochs kept by validation Dice, as top/epochNNN.pt")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="0: off; else validate and keep an exponential "
                             "moving average of the weights, updated after every step with this decay")
    amp: bool = Field(True, description="mixed precision (autocast + GradScaler) when training on CUDA")
    foreground_fraction: float = Field(
        0.33, ge=0, le=1, description="tiled training (tile_scale): share of crops centred on a labelled pixel"
    )
    channels: tuple[int, ...] = Field((16, 32, 64, 128), description="level widths; unless set: planned")
    res_units: int = Field(1, ge=0, description="unet: residual units a level; unless set: planned")
    encoder: str = Field("efficientnet-b0", description="flexible_unet: the EfficientNet backbone")
    encoder_weights: Path | None = Field(
        None, description="flexible_unet: a local file of backbone weights (no download); None: random init"
    )
    seed: int = 0
    per_dataset: dict[str, TrainOverrides] = {}

    def for_dataset(self, dataset: str) -> TrainConfig:
        """This config with the dataset's overrides applied."""
        override = self.per_dataset.get(dataset)
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))


class InferConfig(Section):
    overlap: float = Field(0.25, ge=0, lt=1, description="fraction of a tile shared with its neighbour (0.25..0.5)")
    mode: Literal["gaussian", "constant"] = Field(
        "gaussian", description="blending weights of overlapping tiles (gaussian: sigma 1/8 of the tile, as MONAI)"
    )
    batch_size: int = Field(4, ge=1, description="tiles (or frames) per forward pass")
    hflip: bool = Field(
        False, description="test-time augmentation: also predict the left-right mirror image; unless set: planned"
    )
    vflip: bool = Field(
        False, description="test-time augmentation: also predict the upside-down image; unless set: planned"
    )
    band_rows: int = Field(
        4096, ge=16, description="a tiled image taller than this is predicted as several Dask tasks of about "
        "this many rows each (rounded to whole chunk rows)",
    )

    def tta_flips(self) -> list[tuple[int, ...]]:
        """The flipped views to average with the plain one: every combination of the chosen axes (as nnU-Net)."""
        axes = [d for d, on in ((-1, self.hflip), (-2, self.vflip)) if on]
        return [combo for n in range(1, len(axes) + 1) for combo in combinations(axes, n)]


class EnsembleConfig(Section):
    weighting: Literal["mean", "val_dice"] = Field(
        "val_dice", description="mean: every member alike | val_dice: members weighted by their validation Dice"
    )
    threshold: float = Field(
        0.5, gt=0, lt=1,
        description="fixed threshold: used when tuning is off or a class has no positive validation pixels",
    )
    tune: bool = Field(
        True, description="tune one threshold per class on the out-of-fold validation predictions; unless set: planned"
    )
    grid_step: float = Field(
        0.05, ge=0.01, le=0.5,
        description="candidate thresholds step, 2*step, ... below 1 (plus the fixed threshold); unless set: planned",
    )
    batch_frames: int = Field(16, ge=1, description="video frames held in memory at once")


class DatasetAugment(Section):
    """One dataset's training augmentation (segpipe/augment.py): a probability per transform (0: off),
    then the magnitudes. Geometry moves the image and every mask channel together."""
    hflip: float = Field(0.0, ge=0, le=1)
    vflip: float = Field(0.0, ge=0, le=1)
    affine: float = Field(0.0, ge=0, le=1)
    elastic: float = Field(0.0, ge=0, le=1)
    color_jitter: float = Field(0.0, ge=0, le=1)
    black_corner: float = Field(0.0, ge=0, le=1, description="black box at the lower left, image only (Kvasir)")
    clahe: float = Field(0.0, ge=0, le=1)
    scale: tuple[float, float] = Field((0.85, 1.15), description="affine zoom range")
    rotate: float = Field(15.0, ge=0, le=180, description="affine rotation: +-degrees")
    translate: float = Field(0.05, ge=0, le=0.5, description="affine shift: +- fraction of each edge")
    elastic_alpha: float = Field(300.0, gt=0, description="displacement gain (pixels): 300 with sigma 10 ~ 2 px")
    elastic_sigma: float = Field(10.0, gt=0, description="smoothness of the displacement field (pixels)")
    jitter: float = Field(0.2, ge=0, lt=1, description="brightness, contrast, saturation: factor 1 +- jitter")
    hue: float = Field(0.02, ge=0, le=0.5, description="hue shift: +- fraction of the hue circle")
    black_corner_size: tuple[float, float] = Field(
        (0.2, 0.45), description="box width and height, each drawn in this range as a fraction of the edge"
    )
    clahe_clip: float = Field(3.0, ge=1, description="CLAHE clip limit drawn in [1, clahe_clip]")

    @model_validator(mode="after")
    def _ranges(self) -> DatasetAugment:
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale {list(self.scale)} must be 0 < low <= high")
        if not 0 < self.black_corner_size[0] <= self.black_corner_size[1] <= 1:
            raise ValueError(f"black_corner_size {list(self.black_corner_size)} must be 0 < low <= high <= 1")
        return self


class AugmentConfig(Section):
    """Training augmentation per dataset; a dataset left out gets the plan's preset (segpipe/plan.py)."""
    kvasir: DatasetAugment | None = None
    usc_timit: DatasetAugment | None = None
    hand_xray: DatasetAugment | None = None

    def for_dataset(self, dataset: str) -> DatasetAugment | None:
        if dataset not in DATASET_NAMES:
            raise ConfigError(f"augment.{dataset}: unknown dataset; known: {DATASET_NAMES}")
        return getattr(self, dataset)


class PredictConfig(Section):
    """What `tasks.predict` flags for a person to check (segpipe/prediction_files.py)."""
    min_confidence: float = Field(
        0.75, gt=0, lt=1,
        description="a predicted region whose mean probability is below this is flagged low_confidence, "
        "as is an empty prediction with a pixel within half of the threshold",
    )


class PlanConfig(Section):
    """The rules of the plan stage (segpipe/plan.py): budgets and limits it plans within."""
    budget_minutes: dict[Literal[DATASET_NAMES], float] = Field(
        {}, description="training time of all a dataset's folds and archs together (default 20)"
    )
    max_passes: dict[Literal[DATASET_NAMES], PositiveFloat] = Field(
        {}, description="most times a fold sees each training sample (default 150): small data stop here, "
        "not at the budget"
    )
    memory_mb: int = Field(2048, ge=64, description="activation memory a training batch may take")
    max_batch: int = Field(8, ge=1)
    min_object_px: int = Field(
        12, ge=1, description="thinnest extent the smallest objects (5th percentile) keep at the model's scale"
    )
    min_input_px: int = Field(64, ge=16, description="smallest model input side")
    max_input_px: int = Field(192, ge=16, description="largest model input side (whole image, or tile)")
    max_whole_px: int = Field(1024, ge=16, description="images whose median side is larger are tiled")
    base_width: int = Field(16, ge=4, description="widths of the first level; doubled at each level below")
    max_width: int = Field(320, ge=4)
    res_units: int = Field(1, ge=0, description="unet: residual units a level")

    def budget_for(self, dataset: str) -> float:
        return self.budget_minutes.get(dataset, 20.0)

    def passes_for(self, dataset: str) -> float:
        return self.max_passes.get(dataset, 150.0)


class EvaluateConfig(Section):
    """The evaluate stage (segpipe/evaluate.py, segpipe/evaluate_report.py)."""
    surface_tolerance_px: float = Field(
        2.0, ge=0, description="normalised surface Dice: a boundary pixel within this distance (px, at the "
        "case's original resolution) of the other mask's boundary counts as right",
    )
    worst_cases: int = Field(4, ge=0, description="the report shows this many worst cases (frames, for videos)")
    overlay_px: int = Field(512, ge=64, description="longest side of an overlay panel in the report")


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
    augment: AugmentConfig = AugmentConfig()
    plan: PlanConfig = PlanConfig()
    predict: PredictConfig = PredictConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

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
