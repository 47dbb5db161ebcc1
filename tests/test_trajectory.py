"""Trajectory preprocessing: point-file validation, resampling, flow, blur, colours, overlay, assets.

(Equivalence with the official code on whole files is in the golden cases traj_prep_* / blur_kernel.)
"""
import importlib.util
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from tora.config import TrajectoryConfig, load_config
from tora.trajectory import (
    LINE_COLOURS, POINT_COLOUR, TrajectoryError, blur_flow, draw_trajectories, flow_to_rgb, gaussian_kernel,
    load_motion_video, load_tracks, read_point_file, resample_official, resample_spread, resample_uniform,
    rgb_to_video, sparse_flow, to_video_pixels, tracks_to_video)

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_TRAJS = REPO.parent / "shared" / "data" / "trajs"
PROJECT_TRAJS = sorted((REPO / "trajs").glob("*.txt"))


def write(tmp_path, text, name="traj.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------
# Point files
# ----------------------------------------------------------------------------------------------

def test_reads_points_with_spaces_blank_lines_and_trailing_whitespace(tmp_path):
    path = write(tmp_path, "10,20\n 30, 40  \n\n   \n50 ,60\n\n")
    assert read_point_file(path) == [(10, 20), (30, 40), (50, 60)]


@pytest.mark.parametrize("text, line, message", [
    ("1,2\n3;4\n", 2, "expected one 'x,y' integer pair, got '3;4'"),
    ("1,2\n3,4,5\n", 2, "expected one 'x,y' integer pair"),
    ("1,2\n7\n", 2, "expected one 'x,y' integer pair, got '7'"),
    ("1,2\n\n3,4.5\n", 3, "y = '4.5' is not an integer"),  # the blank line still counts
    ("a,2\n3,4\n", 1, "x = 'a' is not an integer"),
    ("1,2\n-3,4\n", 2, r"negative value in point \(-3, 4\)"),
    ("1,2\n3,256\n", 2, r"point \(3, 256\) is outside the 256x256 canvas"),
    ("256,0\n3,4\n", 1, r"point \(256, 0\) is outside the 256x256 canvas"),
])
def test_bad_lines_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, text, "bad_points.txt")
    with pytest.raises(TrajectoryError, match=rf"bad_points\.txt, line {line}: {message}"):
        read_point_file(path)


@pytest.mark.parametrize("text, message", [
    ("", "empty trajectory file"),
    ("\n  \n", "empty trajectory file"),
    ("5,5\n", "only one point; a trajectory needs at least 2"),
])
def test_too_few_points_name_the_file(tmp_path, text, message):
    path = write(tmp_path, text, "short.txt")
    with pytest.raises(TrajectoryError, match=rf"short\.txt: {message}"):
        read_point_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(TrajectoryError, match=r"trajectory file not found: .*nowhere\.txt"):
        load_tracks([tmp_path / "nowhere.txt"], 9, (48, 72))
    with pytest.raises(TrajectoryError, match="no trajectory files given"):
        load_tracks([], 9, (48, 72))
    with pytest.raises(TrajectoryError, match="at least 2 frames, got num_frames=1"):
        load_tracks([write(tmp_path, "1,2\n3,4\n")], 1, (48, 72))


def test_canvas_size_and_clamping(tmp_path, caplog):
    edge = write(tmp_path, "99,49\n100,10\n", "edge.txt")
    with pytest.raises(TrajectoryError, match=r"edge\.txt, line 2: point \(100, 10\) is outside the 100x50"):
        read_point_file(edge, canvas_size=(100, 50))
    path = write(tmp_path, "0,0\n300,-5\n99,49\n", "wide.txt")
    with caplog.at_level(logging.WARNING, logger="tora.trajectory"):
        points = read_point_file(path, canvas_size=(100, 50), out_of_canvas="clamp")
    assert points == [(0, 0), (99, 0), (99, 49)]
    assert len(caplog.records) == 1
    assert "wide.txt, line 2" in caplog.text and "clamped to (99, 0)" in caplog.text


# ----------------------------------------------------------------------------------------------
# Resampling and scaling
# ----------------------------------------------------------------------------------------------

def test_official_interpolation_spreads_and_truncates():
    # 3 points -> 7 frames: 4 missing over 2 segments, 2 each; inserted points are int()-truncated.
    assert resample_official([(0, 0), (10, 0), (10, 5)], 7) == [
        (0, 0), (3, 0), (6, 0), (10, 0), (10, 1), (10, 3), (10, 5)]
    # 4 points -> 9 frames: 5 missing over 3 segments -> 2, 2, 1 (remainder to the first segments).
    resampled = resample_official([(0, 0), (30, 0), (60, 0), (90, 0)], 9)
    assert [x for x, _ in resampled] == [0, 10, 20, 30, 40, 50, 60, 75, 90]


def test_official_subsampling_and_truncation():
    points = [(i, 2 * i) for i in range(100)]
    assert resample_official(points, 49) == points[::2][:49]  # every 2nd point, the first 49
    assert resample_official(points[:57], 49) == points[:49]  # 57 points: plain truncation
    assert resample_official(points[:49], 49) == points[:49]


def test_uniform_resampling_has_constant_speed():
    # Unequal segments: the official rule gives equal *counts* per segment, uniform equal steps.
    assert resample_uniform([(0, 0), (10, 0), (100, 0)], 11) == [(10 * i, 0) for i in range(11)]
    # A pause (repeated points) takes no time; every input point is used even with more points.
    assert resample_uniform([(0, 0), (0, 0), (0, 0), (20, 0)], 5) == [(0, 0), (5, 0), (10, 0), (15, 0), (20, 0)]
    path = [(i, 0) for i in range(60)]
    assert resample_uniform(path, 4) == [(0, 0), (20, 0), (39, 0), (59, 0)]  # 19.67, 39.33 rounded


def test_scaling_to_video_pixels_truncates():
    pixels = to_video_pixels([(0, 0), (128, 128), (255, 255), (100, 3)], (256, 256), (480, 720))
    assert pixels.dtype == torch.int64
    assert pixels.tolist() == [[0, 0], [360, 240], [717, 478], [281, 5]]


def test_load_tracks_follows_config(tmp_path):
    files = [write(tmp_path, "0,0\n10,0\n100,0\n", "a.txt"), write(tmp_path, "0,0\n0,200\n", "b.txt")]
    official = load_tracks(files, 11, (256, 256))
    assert official.shape == (2, 11, 2)
    assert official[0, :, 0].tolist() == [0, 2, 4, 6, 8, 10, 28, 46, 64, 82, 100]
    cfg = load_config([], ["trajectory.resample=uniform", "trajectory.canvas_width=128"]).trajectory
    uniform = load_tracks(files, 11, (256, 256), cfg)
    assert uniform[0, :, 0].tolist() == [20 * i for i in range(11)]  # x doubled by the 128 canvas


# ----------------------------------------------------------------------------------------------
# Flow, blur, colours
# ----------------------------------------------------------------------------------------------

def test_sparse_flow_writes_next_frame_at_previous_position():
    tracks = torch.tensor([[[1, 2], [4, 3], [6, 3]],
                           [[5, 0], [4, 3], [2, 2]]])  # [N=2, F=3, 2]; both at (4, 3) in frame 1
    flow = sparse_flow(tracks, (6, 8))
    assert flow.shape == (3, 6, 8, 2) and flow.dtype == torch.float32
    assert not flow[0].any()
    assert flow[1, 2, 1].tolist() == [3, 1]  # track 0: (1,2) -> (4,3), written at row 2, column 1
    assert flow[1, 0, 5].tolist() == [-1, 3]
    assert flow[2, 3, 4].tolist() == [-2, -1]  # track 1 overwrites track 0's (2, 0) at (4, 3)
    assert (flow != 0).any(-1).sum() == 3


def test_sparse_flow_rejects_tracks_outside_the_video():
    with pytest.raises(TrajectoryError, match="inside the 8x6 video"):
        sparse_flow(torch.tensor([[[0, 0], [8, 1]]]), (6, 8))
    with pytest.raises(TrajectoryError, match="integer"):
        sparse_flow(torch.zeros(1, 3, 2), (6, 8))


def test_blur_turns_a_displacement_into_a_gaussian_with_the_same_peak():
    flow = torch.zeros(2, 41, 41, 2)
    flow[1, 20, 20] = torch.tensor([3.0, -2.0])
    blurred = blur_flow(flow, kernel_size=21, sigma=4.0)
    kernel = gaussian_kernel(21, 4.0)
    assert kernel[10, 10] == 1 and torch.allclose(kernel, kernel.T)
    torch.testing.assert_close(blurred[1, 10:31, 10:31, 0], 3 * kernel.float())
    torch.testing.assert_close(blurred[1, 10:31, 10:31, 1], -2 * kernel.float())
    assert not blurred[0].any()


@pytest.mark.parametrize("border, cv2_border", [("reflect101", cv2.BORDER_REFLECT_101),
                                                ("zeros", cv2.BORDER_CONSTANT)])
@pytest.mark.parametrize("size_hw", [(12, 17), (5, 7), (1, 6)])  # kernel up to 5x the frame
def test_blur_matches_cv2_filter2d(border, cv2_border, size_hw):
    flow = torch.randn(3, *size_hw, 2, generator=torch.Generator().manual_seed(0))
    kernel = gaussian_kernel(25, 5.0).numpy()
    expected = np.stack([cv2.filter2D(frame, -1, kernel, borderType=cv2_border) for frame in flow.numpy()])
    got = blur_flow(flow, 25, 5.0, border).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-5 * np.abs(expected).max())


def test_blur_settings_are_checked():
    with pytest.raises(ValueError, match="trajectory.blur_border"):
        blur_flow(torch.zeros(1, 4, 4, 2), 3, 1.0, "wrap")
    with pytest.raises(ValueError, match="odd and positive.*got 98"):
        gaussian_kernel(98, 10.0)


def test_flow_to_rgb_global_and_per_chunk_normalisation():
    flow = torch.zeros(4, 3, 5, 2)
    flow[1, 1, 1] = torch.tensor([8.0, 0.0])
    flow[3, 1, 1] = torch.tensor([1.0, 0.0])  # same direction, 8x weaker
    together, chunked = flow_to_rgb(flow), flow_to_rgb(flow, chunk_frames=2)
    assert together.shape == (4, 3, 3, 5) and together.dtype == torch.uint8
    assert (together[0] == 255).all()  # zero flow is white
    assert torch.equal(together[1], chunked[1])
    assert not torch.equal(together[3], chunked[3])  # weak frame saturates only in its own chunk
    assert torch.equal(chunked[3], chunked[1])
    with pytest.raises(ValueError, match="flow_image_chunk_frames"):
        flow_to_rgb(flow, -1)


def test_rgb_to_video_layout_and_range():
    image = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(4, 3, 2, 5)
    video = rgb_to_video(image)
    assert video.shape == (1, 3, 4, 2, 5)
    assert video[0, :, 2, 1, 3].tolist() == pytest.approx([-1.0, 1.0, -0.6])


def test_training_settings_change_the_motion_video():
    tracks = torch.tensor([[[2, 2], [4, 3], [9, 6], [10, 6]]])
    sampling = tracks_to_video(tracks, (8, 12))
    training = tracks_to_video(tracks, (8, 12), TrajectoryConfig(blur_border="zeros", flow_image_chunk_frames=2))
    assert sampling.video.shape == (1, 3, 4, 8, 12) and sampling.video.dtype == torch.float32
    assert sampling.video.min() >= -1 and sampling.video.max() <= 1
    assert not torch.allclose(sampling.flow, training.flow)
    assert not torch.equal(sampling.flow_image, training.flow_image)


# ----------------------------------------------------------------------------------------------
# Overlay
# ----------------------------------------------------------------------------------------------

def test_overlay_draws_lines_and_current_points_without_touching_input():
    frames = np.full((3, 40, 60, 3), 100, dtype=np.uint8)
    original = frames.copy()
    tracks = torch.tensor([[[5, 10], [30, 10], [55, 10]],
                           [[5, 30], [30, 30], [55, 30]]])
    out = draw_trajectories(frames, tracks)
    np.testing.assert_array_equal(frames, original)
    assert out.shape == frames.shape and out.dtype == np.uint8
    def blend(colour):  # 0.3 frame + 0.7 line, up to rounding
        return np.array([0.3 * 100 + 0.7 * c for c in colour])

    assert np.abs(out[2, 10, 20] - blend(LINE_COLOURS[0])).max() <= 0.5  # first line, no point here
    assert np.abs(out[2, 30, 20] - blend(LINE_COLOURS[1])).max() <= 0.5  # second line, own colour
    assert out[2, 20, 20].tolist() == [100, 100, 100]  # between the lines: untouched
    assert out[0, 10, 5].tolist() == list(POINT_COLOUR)  # current point of frame 0 ...
    assert np.abs(out[1, 10, 5] - blend(LINE_COLOURS[0])).max() <= 0.5  # ... only a line in frame 1
    assert out[1, 30, 30].tolist() == list(POINT_COLOUR)


def test_overlay_checks_shapes():
    frames = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"tracks must be \[N, 3, 2\]"):
        draw_trajectories(frames, np.zeros((1, 4, 2), dtype=int))
    with pytest.raises(ValueError, match="frames must be uint8"):
        draw_trajectories(frames.astype(np.float32), np.zeros((1, 3, 2), dtype=int))


# ----------------------------------------------------------------------------------------------
# Real point files
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not OFFICIAL_TRAJS.is_dir(), reason=f"no official trajectories at {OFFICIAL_TRAJS}")
def test_every_official_trajectory_file_processes():
    files = sorted(OFFICIAL_TRAJS.glob("*.txt"))
    assert files
    for path in files:
        motion = load_motion_video([path], 49, (24, 36))
        assert motion.tracks.shape == (1, 49, 2), path
        assert motion.flow.shape == (49, 24, 36, 2), path
        assert motion.video.shape == (1, 3, 49, 24, 36), path


def test_project_trajectories_process_together():
    names = {path.stem for path in PROJECT_TRAJS}
    assert {"circle", "spiral", "wave", "zigzag", "figure_eight", "diagonal", "pause",
            "two_objects_a", "two_objects_b"} <= names
    motion = load_motion_video(PROJECT_TRAJS, 13, (24, 36))
    assert motion.tracks.shape == (len(PROJECT_TRAJS), 13, 2)
    assert motion.flow_image.shape == (13, 3, 24, 36)
    pause = load_tracks([REPO / "trajs" / "pause.txt"], 49, (480, 720))[0]
    assert (pause[:10] == pause[0]).all() and (pause[-1] != pause[0]).all()  # rests, then moves


def test_make_assets_reproduces_the_committed_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_assets", REPO / "scripts" / "make_assets.py")
    make_assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_assets)
    written = make_assets.write_assets(tmp_path)
    for path in written:
        committed = REPO / path.relative_to(tmp_path)
        if path.suffix == ".png":
            np.testing.assert_array_equal(np.array(Image.open(path)), np.array(Image.open(committed)))
        else:
            assert path.read_text() == committed.read_text(), committed
    image = Image.open(tmp_path / "assets" / "images" / "ball.png")
    assert image.size == (720, 480) and image.mode == "RGB"
    for line in (tmp_path / "assets" / "i2v_prompts.txt").read_text().splitlines():
        prompt, image_name = line.split("@@")
        assert prompt and (tmp_path / "assets" / "images" / image_name).is_file()


# -- long files are never cut short silently (issue 14, defect 3) ----------------------------------

def test_default_resampling_keeps_the_whole_path_and_official_truncation_warns(tmp_path, caplog):
    line = write(tmp_path, "".join(f"{x},10\n" for x in range(45)), "line45.txt")  # 45 points, 25 frames
    whole = load_tracks([line], 25, (256, 256))[0]
    assert whole[0].tolist() == [0, 10] and whole[-1].tolist() == [44, 10]  # first and last point
    assert not caplog.records
    cfg = load_config([], ["trajectory.resample=official"]).trajectory
    official = load_tracks([line], 25, (256, 256), cfg)[0]
    assert official[-1].tolist() == [24, 10]  # the official rule: the first 25 points only
    assert (f"{line}: 45 points for 25 frames: trajectory.resample=official uses points 1-25 (step 1) "
            f"and drops the last 20 points (45% of the path length)") in caplog.text


def test_spread_equals_official_up_to_one_point_per_frame():
    for n in (2, 5, 24, 25):
        points = [(i, 2 * i) for i in range(n)]
        assert resample_spread(points, 25) == resample_official(points, 25)
    assert resample_spread([(i, 0) for i in range(50)], 25)[::8] == [(0, 0), (16, 0), (33, 0), (49, 0)]


def test_point_file_with_bom_is_read_and_non_utf8_is_named(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf10,20\n30,40\n")
    assert read_point_file(bom) == [(10, 20), (30, 40)]
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"10,20\n30,40 \xb0\n")
    with pytest.raises(ValueError, match=f"trajectory file {latin}, line 2: not UTF-8"):
        read_point_file(latin)
