"""Atomic outputs: write to a temporary sibling, then rename, so a killed stage never leaves a
half-written artifact where a finished one is expected; what a killed writer left behind is
deleted by the next writer of the same output."""
from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_LIBC = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # from Linux's fcntl.h and fs.h


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `target` when the block succeeds. Its
    name, `.<name>.<host>@<pid>.<random>.tmp`, says which process builds it, so that once that
    process is gone (killed: a failure cleans up itself) the next atomic_dir of `target` on the
    same host deletes it: a killed build of a hand X-ray store leaves gigabytes. (Builders of one
    output on one host must share a pid namespace: a container's pids look dead from outside it.)"""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _delete_abandoned(target)
    prefix = f"{_builder_prefix(target)}{os.getpid()}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))
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


def _builder_prefix(target: Path) -> str:
    """The start of the names of this host's temporaries for `target`; the builder's pid follows."""
    return f".{target.name}.{socket.gethostname()}@"


def _delete_abandoned(target: Path) -> None:
    """Delete this host's temporaries for `target` whose builder process no longer runs."""
    prefix = _builder_prefix(target)
    for path in target.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = path.name[len(prefix):].split(".")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal sent: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


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
