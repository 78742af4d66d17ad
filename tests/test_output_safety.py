"""A stage never replaces what is not its own earlier output (the raw data, a user's folder or file,
another dataset's store), checks every output path before any work, and says what is wrong in one
line; an unreadable raw folder is a clear error too."""
from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import zarr

from segpipe.config import KvasirDemo
from segpipe.datasets import demo_kvasir, visible
from segpipe.errors import IngestError, OutputError
from tasks import demo, evaluate, labels, split, train

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


@pytest.fixture
def raw(tmp_path) -> Path:
    """A small Kvasir raw layout, written by the demo generator."""
    demo_kvasir.write(tmp_path, KvasirDemo(n_cases=4, min_size=64, max_size=80), seed=0)
    return tmp_path / "kvasir"


def contents(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes (hidden ones too): equal only if nothing was added,
    removed or changed."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def files_of(store: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder of a store with its inode and mtime: equal only if none was rewritten."""
    return {p.relative_to(store).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in [store, *store.rglob("*")]}


def ingest(raw: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """The ingest stage's real command line, on Kvasir."""
    return subprocess.run(
        [sys.executable, "-m", "tasks.ingest", "--dataset", "kvasir", "--raw", str(raw), "--out", str(out),
         "--params", str(PARAMS), *args], cwd=ROOT, capture_output=True, text=True)


def assert_refused(proc: subprocess.CompletedProcess, path: Path, reason: str) -> None:
    """Exit code 1 and one line on stderr that names `path` and gives `reason`."""
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(f"error: {path}: ") and reason in proc.stderr, proc.stderr


def store_of(path: Path, **attrs) -> Path:
    """A Zarr store with these root attrs, as another segpipe run (or tool) left it."""
    zarr.open_group(path, mode="w").attrs.update(attrs)
    return path


# --- ingest, through its command line -------------------------------------------------------------


@pytest.mark.parametrize("where, reason", [
    ("raw itself", "is the input folder"),
    ("inside raw", "lies inside the input folder"),
    ("a new path inside raw", "lies inside the input folder"),
    ("above raw", "contains the input folder"),
])
def test_ingest_refuses_an_out_that_is_inside_or_contains_the_raw_data_and_writes_nothing(raw, tmp_path, where,
                                                                                            reason):
    out = {"raw itself": raw, "inside raw": raw / "images", "a new path inside raw": raw / "k.zarr",
           "above raw": tmp_path}[where]
    before = contents(tmp_path)
    proc = ingest(raw, out, "--report", str(tmp_path / "ingest.json"))
    assert_refused(proc, out, f"{reason} {raw}")
    assert contents(tmp_path) == before  # raw untouched, no store, no report, no temporary


def test_ingest_refuses_a_folder_of_a_users_files_and_leaves_them_untouched(raw, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a week of annotations")
    before = contents(tmp_path)
    assert_refused(ingest(raw, mine), mine, "is a folder that segpipe did not write (no .segpipe-output.json in it)")
    assert contents(tmp_path) == before


def test_ingest_refuses_a_plain_file_at_out_and_leaves_it_in_place_untouched(raw, tmp_path):
    (tmp_path / "k.zarr").write_text("not a store")
    before = contents(tmp_path)
    assert_refused(ingest(raw, tmp_path / "k.zarr"), tmp_path / "k.zarr", "is a file, not an earlier ingest output")
    assert contents(tmp_path) == before and (tmp_path / "k.zarr").read_text() == "not a store"


@pytest.mark.parametrize("attrs, reason", [
    ({"dataset": "hand_xray", "classes": ["Radius"], "segpipe_output": {"stage": "ingest", "dataset": "hand_xray"}},
     "is the ingest output of hand_xray, not an earlier ingest output of kvasir"),
    ({"dataset": "hand_xray", "classes": ["Radius"]},  # written before stores were marked
     "is the Zarr store of dataset 'hand_xray'"),
    ({"dataset": "kvasir", "classes": ["polyp"], "segpipe_output": {"stage": "labels", "dataset": "kvasir"}},
     "is the labels output of kvasir"),
])
def test_ingest_refuses_another_datasets_or_stages_store(raw, tmp_path, attrs, reason):
    other = store_of(tmp_path / "other.zarr", **attrs)
    before = contents(tmp_path)
    assert_refused(ingest(raw, other), other, reason)
    assert contents(tmp_path) == before


def test_ingest_reruns_over_its_own_earlier_store(raw, tmp_path):
    first = ingest(raw, tmp_path / "k.zarr", "--report", str(tmp_path / "ingest.json"))
    assert first.returncode == 0, first.stderr
    again = ingest(raw, tmp_path / "k.zarr", "--report", str(tmp_path / "ingest.json"))
    assert again.returncode == 0, again.stderr
    assert "4 found: 0 ingested (0 changed), 4 unchanged" in again.stdout


def test_ingest_refuses_a_report_path_naming_a_folder_before_touching_the_store(raw, tmp_path):
    store = tmp_path / "k.zarr"
    assert ingest(raw, store, "--report", str(tmp_path / "ingest.json")).returncode == 0
    (raw / "images" / "extra.jpg").write_bytes((raw / "images" / "demo0000.jpg").read_bytes())
    (raw / "masks" / "extra.jpg").write_bytes((raw / "masks" / "demo0000.jpg").read_bytes())
    (tmp_path / "reports").mkdir()
    before = files_of(store)
    proc = ingest(raw, store, "--report", str(tmp_path / "reports"))
    assert_refused(proc, tmp_path / "reports", "is a folder; expected the path of a file to write")
    assert files_of(store) == before and list((tmp_path / "reports").iterdir()) == []


# --- the other stages: every output path is checked before any work ---------------------------------


def test_labels_checks_every_output_before_writing_any(disc_stores, tmp_path):
    """A bad --quality is found before the labels store and the rounds folder are written."""
    images, _ = disc_stores
    mine = tmp_path / "quality"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    ns = labels.build_parser().parse_args([
        "--params", str(PARAMS), "--dataset", "kvasir", "--images", str(images.path),
        "--out", str(tmp_path / "new.zarr"), "--quality", str(mine), "--report", str(tmp_path / "labels.json"),
    ])
    with pytest.raises(OutputError, match="quality: is a folder that segpipe did not write"):
        labels.main(ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.zarr", "labels.zarr", "quality"]
    assert (mine / "notes.txt").read_text() == "mine"


def test_the_demo_stage_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "scan.dcm").write_bytes(b"a user's scan")
    refused = f"{tmp_path / 'raw'}: is a folder that segpipe did not write (no .segpipe-output.json in it), " \
              "not an earlier demo output: refusing to replace it"
    with pytest.raises(OutputError, match=re.escape(refused)):
        demo.main(demo.build_parser().parse_args(["--params", str(PARAMS), "--out", str(tmp_path / "raw")]))
    assert (tmp_path / "raw" / "scan.dcm").read_bytes() == b"a user's scan"


@pytest.mark.parametrize("stage, out", [(split, "out"), (evaluate, "out/metrics.json")])
def test_a_json_output_naming_a_folder_is_refused_before_any_input_is_read(tmp_path, stage, out):
    (tmp_path / out).mkdir(parents=True)  # evaluate writes into the folder --out: its metrics.json is a folder here
    ns = stage.build_parser().parse_args([
        "--params", str(PARAMS), "--dataset", "kvasir", "--labels", str(tmp_path / "missing.zarr"),
        "--out", str(tmp_path / "out")])
    with pytest.raises(OutputError, match=f"{out}: is a folder; expected the path of a file to write"):
        stage.main(ns)


def test_evaluate_refuses_a_file_at_its_report_folder_before_any_input_is_read(tmp_path):
    (tmp_path / "out").write_text("mine")
    ns = evaluate.build_parser().parse_args([
        "--params", str(PARAMS), "--dataset", "kvasir", "--labels", str(tmp_path / "missing.zarr"),
        "--out", str(tmp_path / "out")])
    with pytest.raises(OutputError, match=r"cannot create its folder: .*out is a file"):
        evaluate.main(ns)
    assert (tmp_path / "out").read_text() == "mine"


@pytest.mark.parametrize("arg, reason", [("--out", "is a file, not an earlier train output of kvasir"),
                                         ("--metrics", "is a file; expected a folder to write into")])
def test_train_refuses_a_file_at_its_model_or_metrics_folder_before_reading_data(tmp_path, arg, reason):
    (tmp_path / "file").write_text("mine")
    paths = {"--out": tmp_path / "model", "--metrics": tmp_path / "metrics", arg: tmp_path / "file"}
    ns = train.build_parser().parse_args([
        "--params", str(PARAMS), "--dataset", "kvasir", "--arch", "unet", "--fold", "0",
        "--images", str(tmp_path / "missing.zarr"), *(str(x) for pair in paths.items() for x in pair)])
    with pytest.raises(OutputError, match=reason):
        train.main(ns)
    assert (tmp_path / "file").read_text() == "mine"


# --- raw folders that cannot be read ------------------------------------------------------------------


def test_a_path_that_is_not_a_folder_cannot_be_listed_and_says_so(tmp_path):
    (tmp_path / "masks").write_text("")
    with pytest.raises(IngestError, match=f"^{tmp_path / 'masks'}: cannot list: Not a directory$"):
        visible(tmp_path / "masks")


# The Kvasir reader in a child process that, when root (whom chmod 000 does not stop), becomes the
# unprivileged `nobody` after its imports (the interpreter may live where nobody cannot read).
SCAN_UNPRIVILEGED = """
import os, sys
from pathlib import Path
from segpipe.datasets import kvasir
from segpipe.errors import IngestError
if os.geteuid() == 0:
    os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[3]))
try:
    kvasir.scan(Path(sys.argv[1]))
except IngestError as exc:
    print(exc)
"""


def unprivileged_ids() -> tuple[int, int]:
    """The (gid, uid) the child reads as: `nobody` under root, this user otherwise."""
    if os.geteuid() != 0:
        return os.getegid(), os.geteuid()
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root, whom chmod 000 does not stop, and no user 'nobody' to read as")
    return nobody.pw_gid, nobody.pw_uid


def test_an_unreadable_masks_folder_is_an_ingest_error_naming_it():
    gid, uid = unprivileged_ids()
    with tempfile.TemporaryDirectory() as top:  # not under pytest's root-only tmp folder: nobody must reach it
        demo_kvasir.write(Path(top), KvasirDemo(n_cases=4, min_size=64, max_size=80), seed=0)
        for path in [Path(top), *Path(top).rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        raw = Path(top) / "kvasir"
        (raw / "masks").chmod(0)
        try:
            proc = subprocess.run([sys.executable, "-c", SCAN_UNPRIVILEGED, str(raw), str(gid), str(uid)],
                                  cwd=ROOT, capture_output=True, text=True)
        finally:
            (raw / "masks").chmod(0o755)  # so that this user can delete it
    assert proc.stdout == f"{raw / 'masks'}: cannot list: Permission denied\n", proc.stderr
