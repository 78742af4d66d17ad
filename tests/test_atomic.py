"""Atomic outputs: a directory is replaced whole, no kill leaves its path missing or half written, and
only the same stage's earlier output for the same dataset is replaced."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import zarr

import segpipe.atomic
from segpipe.atomic import MARKER, OWNER_KEY, Owner, atomic_dir, resumable_dir
from segpipe.errors import OutputError

OWNER = Owner("stage", "dataset")


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
    with atomic_dir(target, OWNER) as tmp:
        write_version(tmp, "v1")
    return target


def test_a_new_version_replaces_the_previous_whole_and_nothing_is_left_beside_it(previous):
    with atomic_dir(previous, OWNER) as tmp:
        assert version_of(previous) == "v1"  # readers still see the previous one meanwhile
        write_version(tmp, "v2")
    assert version_of(previous) == "v2" and os.listdir(previous.parent) == ["out"]


def test_a_failed_block_leaves_the_previous_version_and_no_temporary(previous):
    with pytest.raises(RuntimeError), atomic_dir(previous, OWNER) as tmp:
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
        with atomic_dir(previous, OWNER) as tmp:
            write_version(tmp, "v2")
    except KeyboardInterrupt:
        pass
    assert version_of(previous) == "v2" and renames == []  # swapped in one step (renameat2)


def test_where_paths_cannot_be_swapped_in_one_step_the_previous_version_is_renamed_aside(previous, monkeypatch):
    monkeypatch.setattr(segpipe.atomic, "_exchange", lambda a, b: False)
    with atomic_dir(previous, OWNER) as tmp:
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
    with atomic_dir(previous, OWNER) as tmp:
        write_version(tmp, "v2")
    assert sorted(os.listdir(previous.parent)) == sorted(["out", building.name, other_host.name])


# --- owned outputs: only the same stage's earlier output for the same dataset is replaced ------


def zarr_group(path, **attrs):
    """A Zarr store with these root attrs, written by stock zarr."""
    zarr.open_group(path, mode="w").attrs.update(attrs)
    return path


def test_a_finished_folder_is_marked_by_a_file_and_a_store_in_its_root_attributes_alone(tmp_path):
    with atomic_dir(tmp_path / "folder", OWNER) as tmp:
        write_version(tmp, "v1")
    with atomic_dir(tmp_path / "store.zarr", OWNER) as tmp:
        zarr_group(tmp, dataset="dataset", classes=["a"])
    assert json.loads((tmp_path / "folder" / MARKER).read_text()) == {"stage": "stage", "dataset": "dataset"}
    attrs = zarr.open_group(tmp_path / "store.zarr", mode="r").attrs.asdict()
    assert attrs[OWNER_KEY] == {"stage": "stage", "dataset": "dataset"}
    assert os.listdir(tmp_path / "store.zarr") == ["zarr.json"]  # no stray file for zarr to warn about


@pytest.mark.parametrize("other", [Owner("other", "dataset"), Owner("stage", "other")])
def test_another_owners_output_is_refused_before_the_block_runs_and_left_as_it_was(previous, other):
    expected = f"{previous}: is the stage output of dataset, not an earlier {other}: refusing to replace it"
    with pytest.raises(OutputError, match="^" + re.escape(expected)):
        with atomic_dir(previous, other):
            pytest.fail("the block ran")
    assert version_of(previous) == "v1" and os.listdir(previous.parent) == ["out"]


def test_a_store_of_an_earlier_segpipe_is_replaced_for_its_dataset_and_refused_for_another(tmp_path):
    """Stores written before the owner mark have no OWNER_KEY; every one has a dataset and a class list."""
    legacy = zarr_group(tmp_path / "old.zarr", dataset="kvasir", classes=["polyp"])
    refused = "is the Zarr store of dataset 'kvasir', not an earlier ingest output of hand_xray"
    with pytest.raises(OutputError, match=refused):
        with atomic_dir(legacy, Owner("ingest", "hand_xray")):
            pytest.fail("the block ran")
    with atomic_dir(legacy, Owner("ingest", "kvasir")) as tmp:
        zarr_group(tmp, dataset="kvasir", classes=["polyp"], version=2)
    assert zarr.open_group(legacy, mode="r").attrs["version"] == 2


def test_a_zarr_store_that_segpipe_did_not_write_is_refused(tmp_path):
    theirs = zarr_group(tmp_path / "theirs.zarr", note="a napari user's annotations")
    with pytest.raises(OutputError, match="is a Zarr store that segpipe did not write"):
        with atomic_dir(theirs, OWNER):
            pytest.fail("the block ran")
    assert zarr.open_group(theirs, mode="r").attrs["note"] == "a napari user's annotations"


def test_folders_without_a_file_hold_nothing_to_lose_and_are_replaced(tmp_path):
    (tmp_path / "out" / "empty" / "folders").mkdir(parents=True)
    with atomic_dir(tmp_path / "out", OWNER) as tmp:
        write_version(tmp, "v1")
    assert version_of(tmp_path / "out") == "v1" and not (tmp_path / "out" / "empty").exists()
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "to").symlink_to(tmp_path / "out", target_is_directory=True)  # a link is not nothing
    with pytest.raises(OutputError, match="is a folder that segpipe did not write"):
        with atomic_dir(tmp_path / "link", OWNER):
            pytest.fail("the block ran")


def test_a_file_in_the_way_of_the_output_folder_is_an_output_error_naming_it(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputError, match=re.escape(f"cannot create its folder: {tmp_path / 'file'} is a file")):
        with atomic_dir(tmp_path / "file" / "sub" / "out", OWNER):
            pytest.fail("the block ran")
    assert (tmp_path / "file").read_text() == "mine"


def test_a_resumable_output_refuses_a_users_folder_and_marks_what_it_swaps_in(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="is a folder that segpipe did not write"):
        with resumable_dir(tmp_path / "mine", False, OWNER):
            pytest.fail("the block ran")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with resumable_dir(tmp_path / "model", False, OWNER) as work:
        write_version(work, "v1")
    with resumable_dir(tmp_path / "model", False, OWNER) as work:  # its own earlier output: replaced
        write_version(work, "v2")
    assert version_of(tmp_path / "model") == "v2" and (tmp_path / "model" / MARKER).is_file()
