"""A plan file (plans/<dataset>.json, written by the plan stage: segpipe/plan.py), as the stages
that follow it read it: train, infer and ensemble take its values where params.yaml has none."""
from __future__ import annotations

import json
from pathlib import Path

from segpipe.config import DatasetAugment, DatasetConfig, EnsembleConfig, InferConfig, TrainConfig
from segpipe.errors import ConfigError


class Plan:
    """A plan file, read by the stages that use it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.data = json.loads(self.path.read_text())
            self.values = {key: item["value"] for key, item in self.data["plan"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.path}: not a plan written by the plan stage ({exc})") from exc

    def dataset_config(self, data: DatasetConfig) -> DatasetConfig:
        size = self.values["image_size"]
        return data.model_copy(update={"image_size": tuple(size), "tile_scale": self.values["tile_scale"]})

    def train_config(self, cfg: TrainConfig) -> TrainConfig:
        """`cfg` with every planned value (the plan already holds params' overrides)."""
        planned = {name: self.values[name] for name in ("epochs", "patience", "batch_size", "res_units", "loss",
                                                        "foreground_fraction")}
        return cfg.model_copy(update={**planned, "channels": tuple(self.values["channels"]), "per_dataset": {}})

    def augment(self) -> DatasetAugment:
        return DatasetAugment.model_validate(self.values["augment"])

    def infer_config(self, cfg: InferConfig) -> InferConfig:
        return cfg.model_copy(update={"hflip": self.values["hflip"], "vflip": self.values["vflip"]})

    def ensemble_config(self, cfg: EnsembleConfig) -> EnsembleConfig:
        return cfg.model_copy(update={"tune": self.values["tune"], "grid_step": self.values["grid_step"]})


