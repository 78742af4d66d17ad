"""The few exception types segpipe raises. Each carries the file and the reason, so a stage
boundary can report exactly what went wrong and where."""
from __future__ import annotations

from pathlib import Path


class SegpipeError(Exception):
    """Base class: anything segpipe raises on purpose."""


class ConfigError(SegpipeError):
    """params.yaml (or a config built in code) is invalid; the message names the key."""


class IngestError(SegpipeError):
    """One raw input file cannot be ingested."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class OutputError(SegpipeError):
    """A stage cannot write an output where it was asked to: the path holds what is not the stage's
    own earlier output (a user's files, the raw data, another stage's store), or cannot be made."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class StoreError(SegpipeError):
    """A Zarr store does not follow segpipe's layout."""
