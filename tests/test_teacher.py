"""Teacher-student rounds: each round's store, the student's labels, warm-up frames, the report,
rounds=0 as before, determinism. A shrunk phantom (2 speakers x 2 videos x 24 frames, model at 32x32)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from segpipe.atomic import MARKER
from segpipe.config import DatasetConfig, InferConfig, PseudolabelConfig, StudentConfig
from segpipe.errors import ConfigError
from segpipe.infer_core import predict_frames
from segpipe.pseudolabel import pseudolabel_store
from segpipe.store import CaseStore
from segpipe.teacher import crispness, hold_out_groups, refine
from segpipe.train import load_model
from tests.usc_phantom import VIDEOS, ingest_like_store, videos

ROOT = Path(__file__).resolve().parents[1]
STUDENT = {"arch": "unet", "image_size": [32, 32], "channels": [8, 16, 32], "epochs": 2, "steps_per_epoch": 3, "batch_size": 4,
           "lr": 0.01, "patience": 2, "val_fraction": 0.2, "seed": 0}
# A student of a few steps is sure of no frame: min_confidence 0 keeps its labels all the same.
CFG = PseudolabelConfig(smooth_frames=3, min_confidence=0.0, rounds=1, student=StudentConfig(**STUDENT))
DATA = DatasetConfig(raw=Path("unused"), in_channels=1, image_size=(32, 32), labels="pseudolabel")
ARRAYS = ("mask", "confidence", "keep")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images(phantom, tmp_path_factory) -> CaseStore:
    return ingest_like_store(tmp_path_factory.mktemp("images") / "images.zarr", list(videos(phantom)))


def _run_stage(phantom: Path, images: CaseStore, out: Path, rounds: int) -> Path:
    """The `labels` stage on the phantom with a small student; returns its output folder."""
    from tasks import labels as stage

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"]["usc_timit"].update(truth=str(phantom / "usc_timit_truth"))
    params["pseudolabel"] = CFG.model_copy(update={"rounds": rounds}).model_dump()
    params["device"] = "cpu"
    out.mkdir()
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    stage.main(stage.build_parser().parse_args([
        "--params", str(out / "params.yaml"), "--dataset", "usc_timit", "--images", str(images.path),
        "--out", str(out / "labels.zarr"), "--rounds-dir", str(out / "rounds"),
        "--report", str(out / "labels.json"), "--quality", str(out / "quality"),
    ]))
    return out


@pytest.fixture(scope="module")
def one_round(phantom, images, tmp_path_factory) -> Path:
    return _run_stage(phantom, images, tmp_path_factory.mktemp("stage") / "one", rounds=1)


def _arrays(store: CaseStore, case_id: str) -> dict[str, np.ndarray]:
    return {name: np.asarray(store.array(case_id, name)[:]) for name in ARRAYS}


def test_one_round_writes_rounds_0_and_1_and_the_training_labels_are_round_1(one_round, images):
    rounds = one_round / "rounds"
    assert sorted(p.name for p in rounds.iterdir() if p.name != MARKER) == ["round0.zarr", "round1.student", "round1.zarr"]
    assert (rounds / "round1.student" / "best.pt").is_file()
    final, round1 = CaseStore(one_round / "labels.zarr"), CaseStore(rounds / "round1.zarr")
    assert final.attrs == round1.attrs and final.case_ids() == round1.case_ids() == images.case_ids()
    for case_id in final.case_ids():
        assert final.case_attrs(case_id) == round1.case_attrs(case_id)
        for name, array in _arrays(final, case_id).items():
            assert np.array_equal(array, _arrays(round1, case_id)[name]), (case_id, name)
    assert not list(one_round.rglob("*.tmp"))


def test_round_1_labels_are_the_students_own_predictions_with_crispness_as_confidence(one_round, images):
    model, meta = load_model(one_round / "rounds" / "round1.student" / "best.pt", CPU)
    round1 = CaseStore(one_round / "rounds" / "round1.zarr")
    assert meta["image_size"] == [32, 32] and meta["channels"] == STUDENT["channels"]
    warm = VIDEOS.warmup_frames
    for case_id in round1.case_ids():
        frames = np.asarray(images.array(case_id, "image")[:])
        prob = predict_frames(model, frames[warm:], meta, InferConfig(batch_size=4), CPU)[:, 0].astype(np.float32)
        got = _arrays(round1, case_id)
        assert np.array_equal(got["mask"][warm:, 0], (prob > 0.5).astype(np.uint8))
        assert np.allclose(got["confidence"][warm:], crispness(prob))
        assert np.array_equal(got["keep"][warm:], (got["confidence"][warm:] >= CFG.min_confidence).astype(np.uint8))


def test_warmup_frames_stay_unlabelled_in_every_round(one_round):
    warm = VIDEOS.warmup_frames
    for name in ("round0.zarr", "round1.zarr"):
        store = CaseStore(one_round / "rounds" / name)
        for case_id in store.case_ids():
            arrays = _arrays(store, case_id)
            assert not arrays["mask"][:warm].any() and not arrays["confidence"][:warm].any()
            assert not arrays["keep"][:warm].any(), (name, case_id)


def test_the_report_lists_every_round_with_counts_dice_and_the_students_verdict(one_round, images):
    report = json.loads((one_round / "quality" / "pseudolabels.json").read_text())
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    n, warm = len(images.case_ids()) * VIDEOS.n_frames, len(images.case_ids()) * VIDEOS.warmup_frames
    for r in rounds:
        assert r["kept"] + r["rejected_low_confidence"] + r["rejected_warmup"] == n and r["rejected_warmup"] == warm
        assert 0 <= r["dice_vs_truth"] <= 1 and 0 <= r["dice_vs_truth_kept"] <= 1
    assert rounds[0]["dice_vs_truth"] >= 0.85  # the classical labels, as tests/test_pseudolabel.py checks
    student = rounds[1]["student"]
    assert student["dice_vs_truth"] == rounds[1]["dice_vs_truth"]  # its raw masks are the round's labels
    held_out = {images.case_attrs(c)["group"] for c in student["val_cases"]}
    assert len(held_out) == 1 and 0 <= student["dice_vs_truth_heldout"] <= 1
    round0 = CaseStore(one_round / "rounds" / "round0.zarr")
    trained_on = [c for c in round0.case_ids() if c not in student["val_cases"]]
    assert student["train_frames"] == sum(int(round0.array(c, "keep")[:].sum()) for c in trained_on)
    assert 0 < student["teacher_dice_vs_truth_at_model_scale"] <= 1
    # The final round is what the headline and the rest of the report describe.
    headline = json.loads((one_round / "labels.json").read_text())
    assert headline["dice_vs_truth"] == rounds[1]["dice_vs_truth"] == report["summary"]["dice_vs_truth"]
    markdown = (one_round / "quality" / "pseudolabels.md").read_text()
    assert "## Teacher-student rounds (1 after the classical labels)" in markdown
    assert f"| 1 | {rounds[1]['kept']} | {rounds[1]['rejected_low_confidence']} |" in markdown
    beats = student["dice_vs_truth"] > rounds[0]["dice_vs_truth_kept"]
    verdict = "it beats them by" if beats else "it does not beat them"
    assert f"Its raw predictions score {student['dice_vs_truth']:.3f} against the truth" in markdown
    assert verdict in markdown


def test_no_rounds_gives_exactly_the_classical_labels(phantom, images, one_round, tmp_path):
    out = _run_stage(phantom, images, tmp_path / "zero", rounds=0)
    assert sorted(p.name for p in (out / "rounds").iterdir() if p.name != MARKER) == ["round0.zarr"]
    classical = pseudolabel_store(images, tmp_path / "classical.zarr", CFG)
    final, round0_of_one = CaseStore(out / "labels.zarr"), CaseStore(one_round / "rounds" / "round0.zarr")
    for case_id in classical.case_ids():
        for name, array in _arrays(classical, case_id).items():
            assert np.array_equal(_arrays(final, case_id)[name], array)
            assert np.array_equal(_arrays(round0_of_one, case_id)[name], array)  # round 0 is round 0 either way
    report = json.loads((out / "quality" / "pseudolabels.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0] and "student" not in report["rounds"][0]
    assert "Teacher-student" not in (out / "quality" / "pseudolabels.md").read_text()


def test_the_same_seed_gives_the_same_round_1_labels(one_round, images, tmp_path):
    again = refine(images, tmp_path / "again", CFG, DATA, CPU)[1]
    first = CaseStore(one_round / "rounds" / "round1.zarr")
    for case_id in first.case_ids():
        for name, array in _arrays(first, case_id).items():
            assert np.array_equal(_arrays(again, case_id)[name], array), (case_id, name)


def test_crispness_is_the_share_of_possible_airway_that_is_sure():
    prob = np.zeros((3, 4, 4), np.float32)
    prob[1, :2] = 0.95  # 8 sure pixels, nothing hedged
    prob[2, :2], prob[2, 2] = 0.95, 0.5  # 8 sure of 12 possible
    assert crispness(prob).tolist() == pytest.approx([0.0, 1.0, 8 / 12])


def test_held_out_groups_are_whole_seeded_and_never_all_of_them(images):
    train, val = hold_out_groups(images, 0.2, seed=0)
    groups = {c: images.case_attrs(c)["group"] for c in images.case_ids()}
    assert sorted(train + val) == images.case_ids() and val
    assert not {groups[c] for c in train} & {groups[c] for c in val}
    assert hold_out_groups(images, 0.2, seed=0) == (train, val)
    assert hold_out_groups(images, 0.9, seed=0)[0]  # at least one group is left to train on


def test_rounds_need_two_groups_and_whole_frame_models(images, tmp_path):
    one_speaker = CaseStore.create(tmp_path / "one.zarr", dataset="usc_timit", classes=["airway"])
    one_speaker.write_case("v1", {"group": "s1", "kind": "video"})
    with pytest.raises(ConfigError, match="at least 2 groups"):
        hold_out_groups(one_speaker, 0.2, seed=0)
    tiled = DATA.model_copy(update={"tile_scale": 0.5})
    with pytest.raises(ConfigError, match="whole-frame"):
        refine(images, tmp_path / "rounds", CFG, tiled, CPU)
    assert not (tmp_path / "rounds").exists()


def test_a_round_whose_student_is_sure_of_no_frame_stops_with_the_reason(images, tmp_path):
    strict = CFG.model_copy(update={"min_confidence": 0.5})
    with pytest.raises(ConfigError, match="round 1's student is sure of no frame"):
        refine(images, tmp_path / "rounds", strict, DATA, CPU)
    assert not (tmp_path / "rounds").exists()


def test_datasets_with_given_masks_get_no_rounds(disc_stores, tmp_path):
    from tasks import labels as stage

    images, labelled = disc_stores
    for case_id in images.case_ids():
        images.write_array(case_id, "mask", labelled.array(case_id, "mask")[:])
    stage.main(stage.build_parser().parse_args([
        "--params", str(ROOT / "params.yaml"), "--dataset", "kvasir", "--images", str(images.path),
        "--out", str(tmp_path / "labels.zarr"), "--report", str(tmp_path / "labels.json"),
        "--quality", str(tmp_path / "quality"),
    ]))
    assert [p.name for p in (tmp_path / "labels.rounds").iterdir() if p.name != MARKER] == ["README.md"]
    assert CaseStore(tmp_path / "labels.zarr").attrs["origin"] == "ingest"
