"""Atomic outputs: a directory is replaced whole, and no kill leaves its path missing or half written."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import segpipe.atomic
from segpipe.atomic import atomic_dir


def write_version(folder, version: str) -> None:
    (folder / "a.txt").write_text(version)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text(version)


def version_of(folder) -> str:
    versions = {(folder / "a.txt").read_text(), (folder / "sub" / "b.txt").read_text()}
    assert len(versions) == 1, f"{folder} mixes versions {versions}"
    return versions.pop()


@pytest.fixture
def previous(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        write_version(tmp, "v1")
    return target


def test_a_new_version_replaces_the_previous_whole_and_nothing_is_left_beside_it(previous):
    with atomic_dir(previous) as tmp:
        assert version_of(previous) == "v1"  # readers still see the previous one meanwhile
        write_version(tmp, "v2")
    assert version_of(previous) == "v2" and os.listdir(previous.parent) == ["out"]


def test_a_failed_block_leaves_the_previous_version_and_no_temporary(previous):
    with pytest.raises(RuntimeError), atomic_dir(previous) as tmp:
        write_version(tmp, "v2")
        raise RuntimeError("stage failed")
    assert version_of(previous) == "v1" and os.listdir(previous.parent) == ["out"]


def test_a_kill_at_any_rename_of_the_swap_leaves_a_whole_version_at_the_target(previous, monkeypatch):
    """Two renames (the previous one aside, the new one in) would leave no target between them."""
    real_replace, renames = os.replace, []

    def killed_at_second_rename(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:
            raise KeyboardInterrupt  # as a kill would stop the process here
        real_replace(src, dst)

    monkeypatch.setattr(segpipe.atomic.os, "replace", killed_at_second_rename)
    try:
        with atomic_dir(previous) as tmp:
            write_version(tmp, "v2")
    except KeyboardInterrupt:
        pass
    assert version_of(previous) == "v2" and renames == []  # swapped in one step (renameat2)


def test_where_paths_cannot_be_swapped_in_one_step_the_previous_version_is_renamed_aside(previous, monkeypatch):
    monkeypatch.setattr(segpipe.atomic, "_exchange", lambda a, b: False)
    with atomic_dir(previous) as tmp:
        write_version(tmp, "v2")
    assert version_of(previous) == "v2" and os.listdir(previous.parent) == ["out"]


def test_a_killed_builders_temporary_is_deleted_by_the_next_build_and_a_running_ones_kept(previous):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    prefix = segpipe.atomic._builder_prefix(previous)
    abandoned = previous.parent / f"{prefix}{gone.stdout.strip()}.x1.tmp"
    building = previous.parent / f"{prefix}{os.getpid()}.x2.tmp"  # a process that runs: this one
    other_host = previous.parent / f".out.elsewhere@{gone.stdout.strip()}.x3.tmp"  # its pids mean nothing here
    for folder in (abandoned, building, other_host):
        folder.mkdir()
        write_version(folder, "partial")
    with atomic_dir(previous) as tmp:
        write_version(tmp, "v2")
    assert sorted(os.listdir(previous.parent)) == sorted(["out", building.name, other_host.name])
