"""Atomic outputs: write to a temporary sibling, then rename, so a killed stage never leaves a
half-written artifact where a finished one is expected."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `target` when the block succeeds."""
    target = Path(target)
    restore_interrupted(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, target)


@contextmanager
def resumable_dir(target: Path, resume: bool) -> Iterator[Path]:
    """Like atomic_dir, but the work directory has a fixed name, `.<name>.partial.tmp` beside `target`
    (ignored by git as *.tmp), and outlives a failure or a kill, so a rerun with resume=True carries
    on with what it holds; resume=False starts it empty."""
    target = Path(target)
    restore_interrupted(target)
    work = target.with_name(f".{target.name}.partial.tmp")
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    yield work
    _replace_dir(work, target)


def restore_interrupted(target: Path) -> None:
    """Put the previous `target` back where a replacement was killed between its two renames
    (_replace_dir), which leaves it aside and no `target`: a reader of `target`, or the next
    replacement, then finds the previous version, not nothing."""
    old = _aside(Path(target))
    if old.exists() and not os.path.lexists(target):
        os.replace(old, target)


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _replace_dir(src: Path, target: Path) -> None:
    old = _aside(target)
    if target.exists():
        _discard(old)
        os.replace(target, old)
    os.replace(src, target)
    _discard(old)


def _discard(path: Path) -> None:
    """Delete a directory, renamed out of the way first: a kill while deleting then leaves a
    temporary behind, never a half-deleted `path` that restore_interrupted would put back."""
    if path.exists():
        trash = Path(tempfile.mkdtemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent))
        os.replace(path, trash / path.name)
        shutil.rmtree(trash, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (sorted keys, so identical data gives identical bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
