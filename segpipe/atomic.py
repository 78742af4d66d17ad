"""Atomic outputs: write to a temporary sibling, then rename, so a killed stage never leaves a
half-written artifact where a finished one is expected."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_LIBC = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # from Linux's fcntl.h and fs.h


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `target` when the block succeeds."""
    target = Path(target)
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
    work = target.with_name(f".{target.name}.partial.tmp")
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    yield work
    _replace_dir(work, target)


def _replace_dir(src: Path, target: Path) -> None:
    """Put `src` at `target`. An existing `target` is swapped with `src` in one step where the
    system can (_exchange), so that no kill leaves `target` missing; elsewhere it is renamed aside
    first, and a kill between the two renames leaves it at `.<name>.old`."""
    if target.exists() and _exchange(src, target):
        shutil.rmtree(src, ignore_errors=True)  # the previous version, now at the temporary name
        return
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(src, target)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE: ext4, xfs, btrfs, tmpfs);
    False where the system or the filesystem cannot."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # the call or the flag unsupported here
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (sorted keys, so identical data gives identical bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
