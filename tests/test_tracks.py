"""Drawn-track geometry, timing and converters (tora.tracks), motion transfer on synthetic clips."""
import json
from pathlib import Path

import numpy as np
import pytest

from tora.config import TrajectoryConfig
from tora.trajectory import load_tracks, read_point_file
from tora import tracks as T

REPO = Path(__file__).resolve().parents[1]
CANVAS = (256, 256)
# (editor width, height), video (H, W): 3:2 landscape as the 5B model, the tiny model, portrait, square
ASPECTS = [((720, 480), (480, 720)), ((576, 384), (96, 144)), ((300, 533), (1280, 720)), ((400, 400), (256, 256))]


@pytest.mark.parametrize("editor_size,video_hw", ASPECTS)
def test_editor_to_canvas_to_video_pixels(editor_size, video_hw):
    width, height = editor_size
    # corners, centre and a point a third of the way: where they land on the canvas and in the video
    editor = np.array([[0, 0], [width - 0.01, height - 0.01], [width / 2, height / 2], [width / 3, 2 * height / 3]])
    canvas = T.editor_to_canvas(editor, editor_size, CANVAS)
    assert canvas[0] == (0, 0) and canvas[1] == (255, 255) and canvas[2] == (128, 128)
    assert canvas[3] == (int(256 / 3), int(2 * 256 / 3))
    pixels = T.per_frame_video_pixels([canvas], CANVAS, video_hw)[0].tolist()
    vh, vw = video_hw
    assert pixels[0] == [0, 0] and pixels[2] == [vw // 2, vh // 2]
    assert pixels[1] == [255 * vw // 256, 255 * vh // 256]  # the last canvas cell starts there
    # every video pixel lies within one canvas cell of the editor position scaled to the video
    assert np.abs(np.array(pixels) - editor * [vw / width, vh / height]).max() <= max(vw, vh) / 256 + 1


@pytest.mark.parametrize("editor_size,video_hw", ASPECTS)
def test_round_trips_between_systems(editor_size, video_hw):
    every = [(x, y) for x in range(0, 256, 5) for y in range(0, 256, 7)]
    back = T.editor_to_canvas(T.canvas_to_editor(every, editor_size, CANVAS), editor_size, CANVAS)
    assert back == every
    pixels = T.per_frame_video_pixels([every], CANVAS, video_hw)[0].numpy()
    vh, vw = video_hw
    canvas_again = T.video_to_canvas(pixels, video_hw, CANVAS)
    if vw >= 256 and vh >= 256:  # a video larger than the canvas: canvas -> video -> canvas is exact
        assert canvas_again == every
    pixels_again = T.per_frame_video_pixels([canvas_again], CANVAS, video_hw)[0].numpy()
    assert (pixels_again == pixels).all()  # video -> canvas -> video is exact for every size


def test_editor_points_outside_are_clamped():
    assert T.editor_to_canvas([[-5, 10], [900, 600]], (720, 480), CANVAS) == [(0, 5), (255, 255)]


def test_timing_as_drawn_follows_the_recorded_samples():
    # 3 samples at x 0, 10 then a long jump to 100: as drawn, each sample is one time step
    track = T.Track([(0, 50), (10, 50), (100, 50)])
    assert T.time_track(track, 5, "as_drawn") == [(0, 50), (5, 50), (10, 50), (55, 50), (100, 50)]
    # a pause (the same sample repeated) is kept as drawn, removed by uniform speed
    paused = T.Track([(0, 0), (0, 0), (0, 0), (40, 0)])
    assert T.time_track(paused, 4, "as_drawn") == [(0, 0), (0, 0), (0, 0), (40, 0)]
    assert T.time_track(paused, 5, "uniform") == [(0, 0), (10, 0), (20, 0), (30, 0), (40, 0)]


def test_timing_uniform_and_ease():
    track = T.Track([(0, 100), (10, 100), (200, 100)])
    uniform = [x for x, _ in T.time_track(track, 11, "uniform")]
    assert uniform == list(range(0, 201, 20))
    eased = [x for x, _ in T.time_track(track, 11, "ease")]
    steps = np.diff(eased)
    assert eased[0] == 0 and eased[-1] == 200 and eased[5] == 100  # symmetric: the middle at mid-path
    assert steps[0] < steps[4] and steps[-1] < steps[5] and (steps >= 0).all()  # slow start and end
    assert steps[0] == pytest.approx(200 * (1 - np.cos(np.pi / 10)) / 2, abs=1)


def test_static_and_too_short_tracks():
    assert T.time_track(T.Track([(30, 40)], static=True), 4) == [(30, 40)] * 4
    with pytest.raises(T.TrackError, match="track 2 has only 1 point; a moving track needs at least 2"):
        T.time_tracks([T.Track([(0, 0), (5, 5)]), T.Track([(30, 40)])], 9)
    with pytest.raises(T.TrackError, match="no tracks"):
        T.time_tracks([], 9)
    with pytest.raises(T.TrackError, match="unknown timing 'fast'"):
        T.time_track(T.Track([(0, 0), (5, 5)]), 9, "fast")


def test_exported_point_files_round_trip_into_sampling(tmp_path):
    """One point per frame: the official resampling of sample_video.py gives back exactly these points."""
    tracks = [T.Track([(10, 20), (200, 30), (120, 240)]), T.Track([(128, 128)], static=True)]
    timed = T.time_tracks(tracks, 25, "ease")
    files = T.write_point_files(tmp_path, timed)
    assert [f.name for f in files] == ["track_1.txt", "track_2.txt"]
    assert [read_point_file(f) for f in files] == timed
    loaded = load_tracks(files, 25, (96, 144), TrajectoryConfig())  # the official resampling rule
    assert (loaded == T.per_frame_video_pixels(timed, CANVAS, (96, 144))).all()
    imported = T.read_point_files(files)
    assert imported[0].points == timed[0] and not imported[0].static and imported[1].static


def test_tracks_npy_round_trip(tmp_path):
    timed = T.time_tracks([T.Track([(0, 0), (255, 128)]), T.Track([(40, 200), (60, 10)])], 9, "uniform")
    positions, visibility = T.arrays_from_tracks(timed, CANVAS, (480, 720))
    assert positions.shape == (9, 2, 2) and positions.dtype == np.float32 and visibility.all()
    np.save(tmp_path / "tracks.npy", positions)
    np.save(tmp_path / "visibility.npy", visibility)
    loaded = T.tracks_from_arrays(*T.load_arrays(tmp_path / "tracks.npy", tmp_path / "visibility.npy"), (480, 720))
    assert [t.points for t in loaded] == timed  # 720x480 >= 256: exact


def test_tracks_npy_hidden_frames_and_errors():
    positions = np.array([[[0, 0]], [[99, 99]], [[20, 40]], [[99, 99]]], dtype=np.float32)  # [4, 1, 2]
    visible = np.array([[True], [False], [True], [False]])
    (track,) = T.tracks_from_arrays(positions, visible, (256, 256))
    assert track.points == [(0, 0), (10, 20), (20, 40), (20, 40)]  # interpolated, then held
    with pytest.raises(T.TrackError, match="point 1 is visible in 1 frame"):
        T.tracks_from_arrays(positions, np.array([[True], [False], [False], [False]]), (256, 256))
    with pytest.raises(T.TrackError, match=r"expected a numeric array \[frames, points, 2\]"):
        T.tracks_from_arrays(np.zeros((4, 2)), None, (256, 256))
    with pytest.raises(T.TrackError, match="visibility must be"):
        T.tracks_from_arrays(positions, np.ones((4, 3), bool), (256, 256))


def test_tracks_json_round_trip_and_errors():
    tracks = [T.Track([(10, 20), (30, 40), (50, 45)], name="a"), T.Track([(7, 8)], static=True)]
    document = T.tracks_document(tracks, 9, "uniform", CANVAS, (96, 144))
    assert document["tracks"][0]["frame_points"][0] == [10, 20] and len(document["tracks"][1]["frame_pixels"]) == 9
    again = T.tracks_from_document(json.dumps(document))
    assert [(t.points, t.static, t.name) for t in again] == [(t.points, t.static, t.name) for t in tracks]
    with pytest.raises(T.TrackError, match="not a tracks file"):
        T.tracks_from_document({"tracks": []})
    with pytest.raises(T.TrackError, match="malformed tracks JSON"):
        T.tracks_from_document("{not json")
    document["tracks"][0]["drawn_points"][0] = [300, 3]
    with pytest.raises(T.TrackError, match=r"track 1 point \(300, 3\) is outside"):
        T.tracks_from_document(document)


# ----------------------------------------------------------------------------------------------
# Motion transfer
# ----------------------------------------------------------------------------------------------

def lk_tracker():
    from tora import motion_transfer

    try:
        return motion_transfer.point_tracker()
    except T.TrackError as err:
        pytest.skip(f"{err} (it is being added on branch 'moving')")


def test_read_clip_rejects_undecodable_video(tmp_path):
    from tora.motion_transfer import read_clip

    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"this is not a video")
    with pytest.raises(T.TrackError, match="cannot decode the video clip.mp4"):
        read_clip(bad)
    frames = read_clip(REPO / "training_examples/videos/disc_line.mp4", max_frames=5)
    assert frames.shape == (5, 240, 360, 3) and frames.dtype == np.uint8


@pytest.mark.parametrize("clip", ["disc_line", "disc_short", "disc_zigzag", "square_circle", "two_objects"])
def test_transfer_follows_synthetic_objects(clip):
    """N points where the clip moves land on its objects, and their tracks copy the objects' motion:
    the displacement from frame 0 matches the ground-truth centre's within a few pixels."""
    from tora.motion_transfer import moving_start_points, read_clip, transfer_tracks

    tracker = lk_tracker()
    truth = json.loads((REPO / f"training_examples/videos/{clip}.json").read_text())
    frames = read_clip(REPO / f"training_examples/videos/{clip}.mp4", max_frames=24)
    height, width = frames.shape[1:3]
    objects = truth["objects"]
    starts = moving_start_points(frames, len(objects), tracker)
    tracks = transfer_tracks(frames, starts, tracker, CANVAS, clip)
    found = set()
    for start, track in zip(starts, tracks):
        centres = [np.array(o["centres"][:len(frames)]) for o in objects]  # [F, 2] (x, y) pixels each
        nearest = int(np.argmin([np.linalg.norm(c[0] - start) for c in centres]))
        found.add(nearest)
        assert np.linalg.norm(centres[nearest][0] - start) <= 1.5 * objects[nearest]["size"]  # on the object
        moved_px = (np.array(track.points) - track.points[0]) * [width / 256, height / 256]
        error_px = np.linalg.norm(moved_px - (centres[nearest] - centres[nearest][0]), axis=1).max()
        assert error_px <= 6.0, f"{clip}: the track's motion is off the object's by {error_px:.1f} px"
    assert found == set(range(len(objects)))  # one point per object


def test_a_still_clip_has_no_moving_points():
    from tora.motion_transfer import moving_start_points

    tracker = lk_tracker()
    still = np.repeat(np.random.default_rng(0).integers(0, 255, (1, 48, 64, 3), dtype=np.uint8), 4, axis=0)
    with pytest.raises(T.TrackError, match="nothing in the clip moves by 2.0 px or more"):
        moving_start_points(still, 2, tracker)


def test_transfer_on_shared_clips():
    from tora.motion_transfer import moving_start_points, read_clip, transfer_tracks

    clips = sorted((REPO.parent / "shared/data").glob("**/*.mp4"))[:2]
    if not clips:
        pytest.skip("no clips in ../shared/data")
    tracker = lk_tracker()
    for clip in clips:
        frames = read_clip(clip, max_frames=16)
        tracks = transfer_tracks(frames, moving_start_points(frames, 3, tracker), tracker, CANVAS, clip.name)
        assert 1 <= len(tracks) <= 3 and all(len(t.points) == len(frames) for t in tracks)


# ----------------------------------------------------------------------------------------------
# The commands
# ----------------------------------------------------------------------------------------------

def run_script(name, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_convert_tracks_command_round_trip(tmp_path):
    done = run_script("convert_tracks.py", "to-npy", REPO / "trajs/circle.txt", REPO / "trajs/wave.txt",
                      "--frames", 25, "--video-size", "720x480", "--out", tmp_path / "npy")
    assert done.returncode == 0, done.stderr
    assert np.load(tmp_path / "npy/tracks.npy").shape == (25, 2, 2)
    done = run_script("convert_tracks.py", "from-npy", tmp_path / "npy/tracks.npy", "--visibility",
                      tmp_path / "npy/visibility.npy", "--video-size", "720x480", "--out", tmp_path / "txt")
    assert done.returncode == 0, done.stderr
    expected = T.time_tracks(T.read_point_files([REPO / "trajs/circle.txt", REPO / "trajs/wave.txt"]), 25)
    assert [read_point_file(tmp_path / f"txt/track_{i}.txt") for i in (1, 2)] == expected
    bad = run_script("convert_tracks.py", "from-npy", tmp_path / "npy/missing.npy", "--video-size", "720x480",
                     "--out", tmp_path)
    assert bad.returncode == 1 and "cannot read" in bad.stderr and "Traceback" not in bad.stderr


def test_extract_tracks_command(tmp_path):
    lk_tracker()
    done = run_script("extract_tracks.py", REPO / "training_examples/videos/disc_line.mp4", "--points", 1,
                      "--max-frames", 16, "--frames", 9, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    points = read_point_file(tmp_path / "track_1.txt")
    assert len(points) == 9 and points[-1][0] > points[0][0] + 10  # the disc moves to the right
    bad = run_script("extract_tracks.py", REPO / "training_examples/videos/disc_line.mp4", "--at", "999,5",
                     "--out", tmp_path)
    assert bad.returncode == 1 and "outside the 360x240 clip" in bad.stderr
