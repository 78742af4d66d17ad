"""The speech-MRI video reader: the two real clips, and small synthetic AVIs for the rest."""
from __future__ import annotations

import re
from pathlib import Path

import av
import h5py
import numpy as np
import pytest

from segpipe.datasets import usc_timit
from segpipe.errors import IngestError
from tests.conftest import SHARED_DATA, needs_shared_data
from tests.usc_files import vocal_tract, write_avi, write_mp4, write_recon
from tests.usc_phantom import decode

F2 = SHARED_DATA / "usc-timit"
SUB001 = SHARED_DATA / "usc-75-speaker"


def clip(n: int = 12, warmup: int = 0, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(n)
    frames = rng.integers(30, 50, (n, size, size)).astype(np.uint8)
    frames[:warmup] = 120
    return frames


@needs_shared_data
def test_real_usc_timit_clip_gives_69_frames_of_68x68_at_23_18_fps_without_warmup():
    (case,) = usc_timit.list_cases(F2)
    assert (case.case_id, case.group) == ("F2_400", "F2")
    data = usc_timit.load_case(case)
    assert data.image.shape == (69, 68, 68) and data.image.dtype == np.uint8 and data.mask is None
    assert data.attrs["fps"] == pytest.approx(23.18, abs=0.005)
    assert data.attrs["kind"] == "video" and data.attrs["warmup_frames"] == 0
    np.testing.assert_allclose(data.arrays["timestamps"], np.arange(69) / data.attrs["fps"], atol=1e-6)


@needs_shared_data
def test_real_75_speaker_clip_gives_3216_frames_of_84x84_at_83_28_fps_with_warmup_flagged():
    (case,) = usc_timit.list_cases(SUB001)
    assert case.group == "sub001" and case.case_id == "sub001_2drt_01_vcv1_r1_video"
    data = usc_timit.load_case(case)
    assert data.image.shape == (3216, 84, 84)
    assert data.attrs["fps"] == pytest.approx(83.28, abs=0.005)
    # The magnetisation decays from ~100 to the ~49 steady state over tens of frames.
    assert 20 <= data.attrs["warmup_frames"] <= 100
    timestamps = data.arrays["timestamps"]
    assert timestamps.dtype == np.float64 and timestamps.shape == (3216,)
    assert timestamps[0] == 0 and np.all(np.diff(timestamps) > 0)
    assert timestamps[-1] == pytest.approx(3215 / data.attrs["fps"], abs=1e-3)


def luma_planes(path: Path) -> np.ndarray:
    """The Y plane of every frame of a YUV video, read straight from the decoder's buffers."""
    planes = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            y = frame.planes[0]  # rows padded to line_size bytes
            planes.append(np.frombuffer(y, np.uint8).reshape(y.height, y.line_size)[:, : y.width])
    return np.stack(planes)


@needs_shared_data
def test_real_75_speaker_frames_are_its_luma_plane_as_coded_neither_stretched_nor_clipped():
    (case,) = usc_timit.list_cases(SUB001)
    coded = luma_planes(case.source)
    # Values outside 16-235 are real signal here: a TV-range reading would clip and stretch them.
    assert coded.min() < 16 and coded.max() > 235
    np.testing.assert_array_equal(usc_timit.load_case(case).image, coded)


def test_synthetic_mp4_keeps_grey_levels_outside_the_tv_range(tmp_path):
    levels = np.array([3, 8, 128, 248, 252])
    write_mp4(tmp_path / "sub001" / "2drt" / "video" / "a_video.mp4",
              np.repeat(levels, 16 * 16).reshape(-1, 16, 16).astype(np.uint8))
    image = usc_timit.load_case(usc_timit.list_cases(tmp_path)[0]).image
    np.testing.assert_allclose(image.mean(axis=(1, 2)), levels, atol=1.5)  # MPEG-4 is lossy


def test_warmup_is_the_leading_run_brighter_than_1_25x_the_second_half_median():
    steady = np.full((20, 4, 4), 40, np.uint8)
    assert usc_timit.warmup_frames(steady) == 0
    head = steady.copy()
    head[:3] = np.array([90, 60, 51])[:, None, None]  # 51 > 1.25 x 40 = 50: still warming up
    head[5] = 90  # a bright frame later on is not warm-up
    assert usc_timit.warmup_frames(head) == 3


def test_synthetic_avi_decodes_frames_fps_and_warmup(tmp_path):
    frames = clip(12, warmup=2)
    write_avi(tmp_path / "M1" / "mri" / "M1_1.avi", frames)
    (case,) = usc_timit.list_cases(tmp_path)
    data = usc_timit.load_case(case)
    np.testing.assert_array_equal(data.image, frames)
    assert data.attrs == {"kind": "video", "fps": pytest.approx(23.18, abs=1e-3), "n_frames": 12,
                          "warmup_frames": 2}


def test_case_ids_gain_the_speaker_prefix_only_when_missing(tmp_path):
    write_avi(tmp_path / "M1" / "mri" / "clip.avi", clip())
    write_avi(tmp_path / "M2" / "mri" / "clip.avi", clip())
    write_avi(tmp_path / "M2" / "mri" / "m2_take3.avi", clip())
    (tmp_path / "M2" / "wav").mkdir()  # other folders of the release are not ours to read
    (tmp_path / "M2" / "wav" / "clip.wav").write_bytes(b"RIFF")
    cases = usc_timit.list_cases(tmp_path)
    assert [(c.case_id, c.group) for c in cases] == [("M1_clip", "M1"), ("M2_clip", "M2"), ("m2_take3", "M2")]


def test_stray_file_in_a_video_folder_is_a_structural_error(tmp_path):
    write_avi(tmp_path / "M1" / "mri" / "M1_1.avi", clip())
    (tmp_path / "M1" / "mri" / "M1_1.txt").write_text("notes")
    with pytest.raises(IngestError, match=r"mri/M1_1\.txt: stray entry"):
        usc_timit.list_cases(tmp_path)


def test_a_video_in_an_upper_case_suffix_is_read(tmp_path):
    write_avi(tmp_path / "M1" / "mri" / "M1_1.AVI", clip())
    assert [c.case_id for c in usc_timit.list_cases(tmp_path)] == ["M1_1"]


@pytest.mark.parametrize("where, message", [
    ("M1/M1_1.avi", r"video where no layout reads it: expected <speaker>/mri/\*\.avi or "
                    r"<speaker>/2drt/video/\*\.mp4"),
    ("F3/MRI/F3_1.avi", r"video where no layout reads it \(folder names are case-sensitive: 'MRI' should be 'mri'\)"),
    ("sub002/2drt/Video/c_video.mp4", r"case-sensitive: '2drt/Video' should be '2drt/video'\)"),
    ("loose.avi", "video where no layout reads it"),
    ("M1/wav/M1_1.MP4", "video where no layout reads it"),
])
def test_a_video_where_no_layout_reads_it_is_a_problem_naming_it_and_the_rest_is_read(tmp_path, where, message):
    write_avi(tmp_path / "F2" / "mri" / "F2_400.avi", clip())
    (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / where).write_bytes(b"RIFF")  # never opened: where it lies is enough
    scan = usc_timit.scan(tmp_path)
    assert [c.case_id for c in scan.cases] == ["F2_400"]
    (problem,) = scan.problems
    assert str(problem).startswith(f"{tmp_path / where}: ") and re.search(message, problem.reason)


def test_the_other_files_of_a_release_copy_are_not_problems(tmp_path):
    write_avi(tmp_path / "F2" / "mri" / "F2_400.avi", clip())
    write_mp4(tmp_path / "sub001" / "2drt" / "video" / "c_video.mp4", vocal_tract(4))
    for other in ("README.txt", "LICENSE", "F2/wav/F2_400.wav", "F2/ema/F2_400.ema", "F2/trans/F2_400.trn",
                  "F2/tracks/F2_400.mat", "sub001/2drt/audio/c_audio.wav", "sub001/2drt/raw/c_raw.h5",
                  "sub001/t2w/sub001_t2w.h5", "sub001/3d/sub001_3d_aa.h5", "F2/.hidden/x.avi", "F2/._F2_1.avi"):
        (tmp_path / other).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / other).write_bytes(b"data")
    scan = usc_timit.scan(tmp_path)
    assert [c.case_id for c in scan.cases] == ["F2_400", "sub001_c_video"] and scan.problems == []


def test_a_folder_inside_a_video_folder_is_one_stray_entry_not_one_per_video_in_it(tmp_path):
    write_avi(tmp_path / "M1" / "mri" / "M1_1.avi", clip())
    write_avi(tmp_path / "M1" / "mri" / "old" / "M1_1.avi", clip())
    assert [str(p) for p in usc_timit.scan(tmp_path).problems] == [
        f"{tmp_path / 'M1' / 'mri' / 'old'}: stray entry: expected only ['.avi'] files here"]


def test_folder_without_videos_is_an_error(tmp_path):
    (tmp_path / "M1").mkdir()
    with pytest.raises(IngestError, match="no videos found"):
        usc_timit.list_cases(tmp_path)


def test_avi_cut_between_frames_is_rejected_as_truncated_against_its_header(tmp_path):
    path = tmp_path / "M1" / "mri" / "M1_1.avi"
    write_avi(path, clip(12, size=16))
    data = path.read_bytes()
    packet = 8 + 16 * 16 * 3  # chunk header + one BGR24 frame
    path.write_bytes(data[: data.index(b"movi") + 4 + 6 * packet])
    with pytest.raises(IngestError, match=r"M1_1\.avi: truncated: decoded 6 of the 12 frames"):
        usc_timit.load_case(usc_timit.list_cases(tmp_path)[0])


def test_avi_cut_inside_a_frame_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "M1" / "mri" / "M1_1.avi"
    write_avi(path, clip(12))
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(IngestError, match=r"M1_1\.avi: (corrupt or undecodable video|truncated)"):
        usc_timit.load_case(usc_timit.list_cases(tmp_path)[0])


def test_garbage_video_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "M1" / "mri" / "M1_1.avi"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a video at all" * 10)
    with pytest.raises(IngestError, match=r"M1_1\.avi: corrupt or undecodable video"):
        usc_timit.load_case(usc_timit.list_cases(tmp_path)[0])


@pytest.mark.parametrize("matlab_order", [True, False])
def test_reconstruction_is_stored_in_the_videos_orientation_however_it_was_written(tmp_path, matlab_order):
    frames = vocal_tract(10)
    write_mp4(tmp_path / "sub001" / "2drt" / "video" / "sub001_vcv1_r1_video.mp4", frames)
    recon = frames.astype(np.float32) / 97  # float images, on their own scale
    # MATLAB writes column-major: read in C order, each frame comes out transposed.
    write_recon(tmp_path / "sub001" / "2drt" / "recon" / "sub001_vcv1_r1_recon.h5",
                recon.transpose(0, 2, 1) if matlab_order else recon)
    (case,) = usc_timit.list_cases(tmp_path)
    assert case.extras == {"recon": tmp_path / "sub001" / "2drt" / "recon" / "sub001_vcv1_r1_recon.h5"}
    data = usc_timit.load_case(case)
    assert data.arrays["recon"].dtype == np.float32
    np.testing.assert_array_equal(data.arrays["recon"], recon)
    assert data.attrs["recon_transposed"] is matlab_order and data.attrs["recon_frames"] == 10
    assert data.attrs["recon_match"] > 0.95 and data.image.shape == (10, 32, 32)


@needs_shared_data
def test_real_75_speaker_video_takes_its_reconstruction_written_as_matlab_writes_it(tmp_path):
    video = SUB001 / "sub001" / "2drt" / "video" / "sub001_2drt_01_vcv1_r1_video.mp4"
    (tmp_path / "sub001" / "2drt").mkdir(parents=True)
    (tmp_path / "sub001" / "2drt" / "video").symlink_to(video.parent)
    frames = decode(video)
    recon = (frames[:3000] / 255).astype(np.float32)  # fewer frames than the video: allowed
    write_recon(tmp_path / "sub001" / "2drt" / "recon" / "sub001_2drt_01_vcv1_r1_recon.h5", recon.transpose(0, 2, 1))
    data = usc_timit.load_case(usc_timit.list_cases(tmp_path)[0])
    np.testing.assert_array_equal(data.arrays["recon"], recon)
    assert data.attrs["recon_transposed"] is True and data.attrs["recon_frames"] == 3000
    assert data.attrs["recon_match"] == 1.0 and data.image.shape == (3216, 84, 84)


def bad_recon(path: Path, problem: str) -> None:
    frames = vocal_tract(10).astype(np.float32)
    if problem == "garbage":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not HDF5" * 50)
    elif problem == "cut":
        write_recon(path, frames)
        path.write_bytes(path.read_bytes()[:1500])
    elif problem in ("group", "empty", "dangling link"):
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            {"group": lambda: f.create_group("recon"),
             "empty": lambda: f.create_dataset("recon", data=h5py.Empty("f4")),
             "dangling link": lambda: f.__setitem__("recon", h5py.SoftLink("/nowhere"))}[problem]()
    else:
        write_recon(path, *{
            "other name": (frames, "image"),
            "one frame": (frames[0],),
            "complex": (frames.astype(np.complex64),),
            "nan": (np.where(frames > 100, np.nan, frames),),
            "other size": (frames[:, :20, :24],),
            "other scene": (np.random.default_rng(0).random((10, 32, 32)),),
        }[problem])


@pytest.mark.parametrize("problem, message", [
    ("garbage", "corrupt or unreadable HDF5 file"),
    ("cut", "corrupt or unreadable HDF5 file"),
    ("group", r"'recon' is a group, expected \(frames, height, width\) images"),
    ("empty", "'recon' is an empty dataset"),
    ("dangling link", "corrupt or unreadable HDF5 file: .*not found"),
    ("other name", r"no 'recon' dataset \(found: \['image'\]\)"),
    ("one frame", r"'recon' is float32 \(32, 32\), expected real \(frames, height, width\) images"),
    ("complex", r"'recon' is complex64 \(10, 32, 32\)"),
    ("nan", "'recon' holds NaN or infinite values"),
    ("other size", "frames of 20x24 px, its video's are 32x32"),
    ("other scene", r"does not match its video: its mean frame correlates -?0\.\d\d"),
])
def test_a_bad_reconstruction_is_rejected_naming_the_file(tmp_path, problem, message):
    write_mp4(tmp_path / "sub001" / "2drt" / "video" / "c_video.mp4", vocal_tract(10))
    bad_recon(tmp_path / "sub001" / "2drt" / "recon" / "c_recon.h5", problem)
    with pytest.raises(IngestError, match=rf"recon/c_recon\.h5: {message}"):
        usc_timit.load_case(usc_timit.list_cases(tmp_path)[0])


def test_a_damaged_reconstruction_raises_only_ingest_errors_wherever_the_damage_is(tmp_path):
    frames = vocal_tract(10)
    good = tmp_path / "good.h5"
    write_recon(good, frames.astype(np.float32))
    original, outcomes = good.read_bytes(), set()
    for offset in range(0, 2048):  # superblock, object headers, heaps, B-trees, the start of the data
        for value in (0x00, 0xFF):
            damaged = tmp_path / "damaged.h5"
            damaged.write_bytes(original[:offset] + bytes([value]) + original[offset + 1:])
            try:
                usc_timit.read_recon(damaged, frames)
                outcomes.add("read")
            except IngestError as exc:  # anything else would stop a whole ingest, even with on_error: skip
                assert str(exc).startswith(f"{damaged}: ")
                outcomes.add("rejected")
    assert outcomes == {"read", "rejected"}


def test_a_reconstruction_without_its_video_a_second_one_a_second_video_and_a_stray_file_are_problems(tmp_path):
    frames = vocal_tract(4)
    write_mp4(tmp_path / "sub001" / "2drt" / "video" / "a_video.mp4", frames)
    write_mp4(tmp_path / "sub001" / "2drt" / "video" / "c.mp4", frames)
    write_mp4(tmp_path / "sub001" / "2drt" / "video" / "c_video.mp4", frames)
    recons = tmp_path / "sub001" / "2drt" / "recon"
    write_recon(recons / "a_recon.h5", frames.astype(np.float32))
    write_recon(recons / "a.h5", frames.astype(np.float32))
    write_recon(recons / "b_recon.h5", frames.astype(np.float32))
    (recons / "notes.txt").write_text("reconstructed with lambda 0.08")
    scan = usc_timit.scan(tmp_path)
    assert [(c.case_id, c.extras) for c in scan.cases] == [("sub001_a_video", {"recon": recons / "a.h5"}),
                                                           ("sub001_c", {})]
    videos = tmp_path / "sub001" / "2drt" / "video"
    assert sorted(str(p) for p in scan.problems) == sorted([
        f"{videos / 'c_video.mp4'}: a second video of clip 'c' (also c.mp4)",
        f"{recons / 'a_recon.h5'}: a second reconstruction of clip 'a' (also a.h5)",
        f"{recons / 'b_recon.h5'}: reconstruction without its video (no video of clip 'b' in sub001/2drt/video/)",
        f"{recons / 'notes.txt'}: stray entry: expected only ['.h5'] files here",
    ])
