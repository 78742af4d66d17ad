"""Atomic outputs: write to a temporary sibling, then rename, so a killed stage never leaves a
half-written artifact where a finished one is expected; what a killed writer left behind is
deleted by the next writer of the same output.

Owned outputs: a swap deletes whatever was at the target, so an output directory is replaced only
when it is the same stage's earlier output for the same dataset (see check_replaceable), never a
user's folder, the raw data or another output that a mistyped path names. A finished output is
marked with its Owner just before it is swapped in: a Zarr store in its root attributes, any other
folder by a MARKER file in it.
"""
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr

from segpipe.errors import OutputError

_LIBC = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # from Linux's fcntl.h and fs.h

OWNER_KEY = "segpipe_output"  # the root attribute that marks a Zarr store output
MARKER = ".segpipe-output.json"  # the file that marks any other output folder (never a store: zarr warns of it)


@dataclass(frozen=True)
class Owner:
    """Which stage writes an output, for which dataset (None: the demo, which is every dataset's)."""

    stage: str
    dataset: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "dataset": self.dataset}

    def store_attrs(self) -> dict[str, Any]:
        """The root attribute that marks a Zarr store as this owner's output."""
        return {OWNER_KEY: self.to_json()}

    def __str__(self) -> str:
        return f"{self.stage} output" + (f" of {self.dataset}" if self.dataset else "")


@contextmanager
def atomic_dir(target: Path, owner: Owner) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `target` when the block succeeds. Its
    name, `.<name>.<host>@<pid>.<random>.tmp`, says which process builds it, so that once that
    process is gone (killed: a failure cleans up itself) the next atomic_dir of `target` on the
    same host deletes it: a killed build of a hand X-ray store leaves gigabytes. (Builders of one
    output on one host must share a pid namespace: a container's pids look dead from outside it.)
    Only `owner`'s earlier output is replaced: anything else at `target` is an OutputError, raised
    before the block runs, so no work is spent on an output that could not be swapped in."""
    target = Path(target)
    check_replaceable(target, owner)
    target.parent.mkdir(parents=True, exist_ok=True)
    _delete_abandoned(target)
    prefix = f"{_builder_prefix(target)}{os.getpid()}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _mark(tmp, owner)  # last, so that no kill leaves a finished output unmarked at `target`
    _replace_dir(tmp, target)


@contextmanager
def resumable_dir(target: Path, resume: bool, owner: Owner) -> Iterator[Path]:
    """Like atomic_dir, but the work directory has a fixed name, `.<name>.partial.tmp` beside `target`
    (ignored by git as *.tmp), and outlives a failure or a kill, so a rerun with resume=True carries
    on with what it holds; resume=False starts it empty."""
    target = Path(target)
    check_replaceable(target, owner)
    work = target.with_name(f".{target.name}.partial.tmp")
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    yield work
    _mark(work, owner)
    _replace_dir(work, target)


def check_replaceable(target: Path, owner: Owner) -> None:
    """Raise OutputError unless an output of `owner` may be written at `target`: its folder can be
    made, and nothing is there (or folders without a file: nothing to lose), or `owner` marked it."""
    target = Path(target)
    check_parent(target)
    if not target.exists() or _holds_no_file(target):
        return
    found = _foreign(target, owner)
    if found:
        raise OutputError(target, f"is {found}, not an earlier {owner}: refusing to replace it "
                                  "(move it away or choose another path)")


def check_parent(path: Path) -> None:
    """Raise OutputError unless the folder of `path` exists or can be made (a file in its way is a
    mistyped path: say so, rather than fail with a traceback after the work is done)."""
    for ancestor in Path(path).absolute().parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputError(path, f"cannot create its folder: {ancestor} is a file")
            return


def _holds_no_file(folder: Path) -> bool:
    """Whether `folder` holds nothing but folders (not links to them), at any depth."""
    try:
        with os.scandir(folder) as entries:
            return all(e.is_dir(follow_symlinks=False) and _holds_no_file(Path(e.path)) for e in entries)
    except OSError:  # not a folder, or unreadable: not known to hold nothing
        return False


def _foreign(target: Path, owner: Owner) -> str | None:
    """What `target` holds when it is not `owner`'s own earlier output; None when it is."""
    if not target.is_dir():
        return "a file"
    if (target / "zarr.json").is_file():
        return _foreign_store(target, owner)
    try:
        mark = json.loads((target / MARKER).read_text())
    except FileNotFoundError:
        return f"a folder that segpipe did not write (no {MARKER} in it)"
    except (OSError, ValueError) as exc:
        return f"a folder whose {MARKER} cannot be read ({exc})"
    return None if mark == owner.to_json() else _described(mark)


def _foreign_store(store: Path, owner: Owner) -> str | None:
    """The same for a Zarr store. A store of an earlier segpipe, from before OWNER_KEY, is taken as
    `owner`'s when it holds the same dataset: every segpipe store has a dataset and a class list."""
    try:
        attrs = zarr.open_group(store, mode="r").attrs.asdict()
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return f"a Zarr store that cannot be read as a group ({exc})"
    if OWNER_KEY in attrs:
        return None if attrs[OWNER_KEY] == owner.to_json() else _described(attrs[OWNER_KEY])
    if not isinstance(attrs.get("classes"), list) or "dataset" not in attrs:
        return "a Zarr store that segpipe did not write"
    return None if attrs["dataset"] == owner.dataset else f"the Zarr store of dataset {attrs['dataset']!r}"


def _described(mark: Any) -> str:
    try:
        return f"the {Owner(**mark)}"
    except TypeError:  # not a mapping of Owner's fields
        return f"an output marked {mark!r}"


def _mark(folder: Path, owner: Owner) -> None:
    """Mark the finished output in `folder` as `owner`'s (a store may hold the mark already: ingest
    compares its root attributes to tell an up-to-date store)."""
    if not (folder / "zarr.json").is_file():
        (folder / MARKER).write_text(json.dumps(owner.to_json(), sort_keys=True) + "\n")
        return
    group = zarr.open_group(folder, mode="r+")
    if group.attrs.get(OWNER_KEY) != owner.to_json():
        group.attrs.update(owner.store_attrs())


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
