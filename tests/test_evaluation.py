"""TrajError protocol: metrics on hand-made cases, trackers against ground truth, the eval_traj CLI."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.models.optical_flow import raft_small

from tora.evaluation import (ColourParams, EvalConfig, EvaluationError, PatchParams, RaftParams, SampleVideo,
                             TargetColour, colour_mask, evaluate, frame_strip, lk_step, load_clips, load_run,
                             markdown_table, nearest_component, ratios, resolve_colours, summarise,
                             track_colour, track_patch, trajectory_error)
from tora.moving_objects import (BACKGROUNDS, PALETTE, GeneratorConfig, held_out_clip, random_clip,
                                 read_ground_truth, render_clip, write_random_clip)
from tora.tracking import LKParams, track_points_lk
from tora.video_io import read_mp4, write_mp4

REPO = Path(__file__).resolve().parents[1]
SHARED_CLIPS = REPO.parent / "shared" / "data" / "training_examples" / "videos"
CFG = GeneratorConfig()


def load_eval_script():
    spec = importlib.util.spec_from_file_location("eval_traj", REPO / "scripts" / "eval_traj.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_traj"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """Eight training-style clips (1-3 objects, sub-pixel paths) written through the real writer."""
    out = tmp_path_factory.mktemp("clips")
    for index in range(8):
        write_random_clip(out, random_clip("train", 11, index, CFG), CFG)
    return out


def fake_run(root: Path, clips, shift=(0, 0), static=False) -> Path:
    """A sampling output folder: video/<name>.mp4 (the clip, or its first frame held), traj/<name>.json
    (its whole-pixel path + shift), prompt/<name>.txt."""
    for sub in ("video", "traj", "prompt"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for clip in clips:
        name = f"0000_{clip.name}_seed1"
        frames = render_clip(clip)
        write_mp4(root / "video" / f"{name}.mp4", np.repeat(frames[:1], len(frames), 0) if static else frames, CFG.fps)
        points = (clip.centres + np.array(shift)).astype(int).tolist()
        (root / "traj" / f"{name}.json").write_text(json.dumps({"files": [], "video_size_hw": [96, 144],
                                                                "points_xy": points}))
        (root / "prompt" / f"{name}.txt").write_text(clip.caption + "\n")
    return root


@pytest.fixture(scope="module")
def held_out_clips():
    return [held_out_clip(index, 5, CFG) for index in range(3)]


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def test_trajectory_error_exact_numbers():
    requested = np.array([[0.0, 0.0], [10.0, 10.0]])
    tracked = np.array([[3.0, 4.0], [10.0, 10.0]])
    score = trajectory_error(requested, tracked, np.array([True, False]), (3, 4))  # diagonal 5
    assert score["l1"] == 3.5 and score["l2"] == 2.5
    assert score["l1_pct"] == pytest.approx(70.0) and score["l2_pct"] == pytest.approx(50.0)
    assert score["found"] == 0.5 and score["curve"] == [5.0, 0.0]


def test_summary_averages_trajectories_and_ratio():
    scores = [dict(trajectory_error(np.zeros((2, 2)), np.full((2, 2), d), np.ones(2, bool), (30, 40)),
                   video=v, num_objects=n) for d, v, n in ((1.0, "a", 1), (3.0, "b", 2), (5.0, "b", 2))]
    summary = summarise(scores)
    assert summary["l1"] == pytest.approx(6.0) and summary["l2"] == pytest.approx(3 * np.sqrt(2))
    assert summary["worst_l2"] == pytest.approx(5 * np.sqrt(2)) and summary["videos"] == 2
    assert summary["worst_l2_pct"] == pytest.approx(100 * 5 * np.sqrt(2) / 50) and summary["min_found"] == 1.0
    assert summary["trajectories"] == 3 and summary["curve"] == pytest.approx([3 * np.sqrt(2)] * 2)
    assert summary["by_num_objects"]["2"]["l1"] == pytest.approx(8.0)
    baseline = dict(summary, l1=24.0, l2=12 * np.sqrt(2), l1_pct=summary["l1_pct"] * 4, l2_pct=summary["l2_pct"] * 4)
    assert ratios(summary, baseline) == pytest.approx({"l1": 0.25, "l2": 0.25, "l1_pct": 0.25, "l2_pct": 0.25})
    table = markdown_table(summary, baseline)
    assert "| TrajError L1 (px) | 6.00 | 24.00 | 0.250 |" in table
    with pytest.raises(EvaluationError, match="no trajectory"):
        summarise([])


# ----------------------------------------------------------------------------------------------
# Colour tracker
# ----------------------------------------------------------------------------------------------

def test_colour_mask_keeps_palette_colours_apart():
    frame = np.array([[PALETTE["red"], PALETTE["orange"], (105, 105, 105), (200, 50, 45)]], np.uint8)
    red = TargetColour(PALETTE["red"], "red", "caption")
    assert colour_mask(frame, red, 90.0).tolist() == [[True, False, False, True]]
    raw = TargetColour(PALETTE["red"], None, "frame")  # no palette rule: distance only
    assert colour_mask(frame, raw, 110.0).tolist() == [[True, True, False, True]]


def test_nearest_component_and_lost_frames():
    mask = np.zeros((20, 20), bool)
    mask[2:5, 2:5] = True  # centroid (3, 3)
    mask[14:17, 10:13] = True  # centroid (11, 15)
    mask[0, 19] = True  # noise
    np.testing.assert_allclose(nearest_component(mask, np.array([9.0, 13.0]), 3), [11, 15])
    assert nearest_component(np.zeros((4, 4), bool), np.zeros(2), 1) is None
    frames = np.zeros((3, 20, 20, 3), np.uint8)
    frames[0, 5:8, 5:8] = PALETTE["green"]  # found in frame 0 only
    positions, found = track_colour(frames, np.array([4.0, 4.0]), TargetColour(PALETTE["green"], "green", "x"),
                                    ColourParams())
    assert found.tolist() == [True, False, False] and positions.tolist() == [[6, 6]] * 3


def test_colour_tracker_matches_ground_truth_within_a_pixel(clip_dir):
    result = evaluate(load_clips(clip_dir), EvalConfig(tracker="colour"))
    assert result.summary["trajectories"] > 6  # several multi-object clips
    assert result.summary["found"] == 1.0
    assert max(s["l2"] for s in result.scores) < 1.0 and result.summary["l2"] < 0.5
    assert {c.source for colours in result.colours.values() for c in colours} == {"caption"}


def test_colour_from_frame_finds_the_same_palette_colours(clip_dir):
    videos = load_clips(clip_dir)
    for video in videos:
        frame0 = read_mp4(video.video)[0]
        by_caption = resolve_colours(video, frame0, ColourParams(colour_from="caption"))
        by_frame = resolve_colours(video, frame0, ColourParams(colour_from="frame"))
        assert [c.palette_name for c in by_caption] == [c.palette_name for c in by_frame]
    bad = SampleVideo("x", videos[0].video, "a red disc", np.zeros((2, 25, 2)))
    with pytest.raises(EvaluationError, match="names 1 palette colours .* for 2 trajectories"):
        resolve_colours(bad, frame0, ColourParams(colour_from="caption"))


# ----------------------------------------------------------------------------------------------
# LK tracker
# ----------------------------------------------------------------------------------------------

def test_lk_tracker_error_is_bounded_on_synthetic_clips(clip_dir):
    """On plain (flat or textured) backgrounds.  Outdoor scenes, where a strong static edge (the
    horizon) crosses the LK window, make LK drift (docs/EVALUATION.md); the colour tracker is the
    one for those."""
    videos = [v for v in load_clips(clip_dir) if read_ground_truth(v.video)["background"]["name"] in BACKGROUNDS]
    assert len(videos) >= 3
    result = evaluate(videos, EvalConfig(tracker="lk"))
    assert result.summary["l2"] < 0.6 and max(s["l2"] for s in result.scores) < 2.0
    assert result.summary["found"] > 0.95


def test_track_points_lk_shapes_visibility_and_errors():
    clip = random_clip("train", 11, 0, CFG)
    frames = render_clip(clip)
    start = np.vstack([clip.centres[:, 0], [[-5.0, 3.0]]])  # the objects' centres + one point off the frame
    tracks, visible = track_points_lk(frames, start)
    assert tracks.shape == (25, len(start), 2) and tracks.dtype == np.float32 and visible.dtype == bool
    np.testing.assert_array_equal(tracks[0], start.astype(np.float32))
    assert not visible[:, -1].any() and (tracks[:, -1] == start[-1]).all()  # lost: frozen
    with pytest.raises(ValueError, match="uint8"):
        track_points_lk(frames.astype(np.float32), start)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        track_points_lk(frames, start[:, :1])
    # a point once lost stays lost
    assert all(not visible[t + 1:, n].any() for n in range(len(start)) for t in range(24) if not visible[t, n])


@pytest.mark.skipif(not SHARED_CLIPS.is_dir(), reason="../shared/data not present")
def test_lk_sanity_on_real_clip_forward_backward():
    """A real clip (official example): points tracked over 9 frames and back end where they started."""
    frames = read_mp4(SHARED_CLIPS / "1.mp4")[:9]
    frames = frames[:, ::4, ::4].copy()  # small: fast on 2 cores
    height, width = frames.shape[1:3]
    grid = np.stack(np.meshgrid(np.linspace(10, width - 10, 6), np.linspace(10, height - 10, 4)), -1).reshape(-1, 2)
    tracks, visible = track_points_lk(frames, grid, params=LKParams(window_size=21))
    assert visible[-1].mean() > 0.5
    alive = visible[-1]
    back, back_visible = track_points_lk(frames[::-1].copy(), tracks[-1, alive])
    returned = back_visible[-1]
    assert returned.mean() > 0.5
    assert np.median(np.linalg.norm(back[-1, returned] - grid[alive][returned], axis=1)) < 1.0


# ----------------------------------------------------------------------------------------------
# RAFT tracker
# ----------------------------------------------------------------------------------------------

def test_raft_tracker_needs_weights_and_runs_with_them(tmp_path, held_out_clips):
    run = fake_run(tmp_path / "run", held_out_clips[:1])
    videos = load_run(run)
    with pytest.raises(EvaluationError, match=r"RAFT weights not found at .*none.pth \(--raft-weights\).*"
                                              r"download.pytorch.org/models/raft_large"):
        evaluate(videos, EvalConfig(tracker="raft", raft=RaftParams(weights=str(tmp_path / "none.pth"))))
    torch.manual_seed(0)
    weights = tmp_path / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), weights)  # random weights: plumbing only
    videos[0].requested = videos[0].requested[:, :3]
    trimmed = tmp_path / "short.mp4"
    write_mp4(trimmed, read_mp4(videos[0].video)[:3], CFG.fps)
    videos[0].video = trimmed
    cfg = EvalConfig(tracker="raft", raft=RaftParams(model="raft_small", weights=str(weights), iterations=2))
    result = evaluate(videos, cfg)
    assert len(result.scores[0]["curve"]) == 3 and np.isfinite(result.summary["l2"])


# ----------------------------------------------------------------------------------------------
# Runs and the CLI
# ----------------------------------------------------------------------------------------------

def test_eval_cli_zero_and_shifted_error_and_baseline(tmp_path, held_out_clips, capsys):
    script = load_eval_script()
    run = fake_run(tmp_path / "exact", held_out_clips)
    report = script.run(script.parse_args([str(run), "--tracker", "colour"]))
    assert report["summary"]["l2"] < 0.5 and report["summary"]["found"] == 1.0
    assert report["trajectories"][0]["found_frames"] == [True] * 25
    assert json.loads((run / "trajerror_colour.json").read_text())["summary"]["l2"] == report["summary"]["l2"]

    # requested paths 3 px right and 4 px down of where the objects are: L1 7 px, L2 5 px
    shifted = fake_run(tmp_path / "shifted", held_out_clips, shift=(3, 4))
    report = script.run(script.parse_args([str(shifted), "--json", str(tmp_path / "s.json")]))
    assert report["summary"]["l2"] == pytest.approx(5.0, abs=0.5)
    assert report["summary"]["l1"] == pytest.approx(7.0, abs=0.7)

    # baseline: the same names, the objects never move (motion dropped)
    baseline = fake_run(tmp_path / "static", held_out_clips, static=True)
    shutil.rmtree(baseline / "traj")  # a --no-flow-injection run writes no traj/
    capsys.readouterr()
    report = script.run(script.parse_args([str(run), "--baseline", str(baseline), "--per-video",
                                           "--strips", str(tmp_path / "strips"), "--strip-videos", "2",
                                           "--plots", str(tmp_path / "plots")]))
    printed = capsys.readouterr().out
    motion_l2, baseline_l2 = report["summary"]["l2"], report["baseline_summary"]["l2"]
    assert baseline_l2 > 5 and report["ratio"]["l2"] == pytest.approx(motion_l2 / baseline_l2)
    assert f"| {report['ratio']['l2']:.3f} |" in printed and "without motion" in printed
    assert len(list((tmp_path / "strips").glob("*.png"))) == 2
    assert (tmp_path / "plots" / "trajerror_per_frame.png").stat().st_size > 1000


def test_eval_run_errors_name_the_problem(tmp_path, held_out_clips):
    with pytest.raises(EvaluationError, match="no traj/"):
        load_run(tmp_path)
    run = fake_run(tmp_path / "run", held_out_clips[:1])
    traj = next((run / "traj").glob("*.json"))
    good = traj.read_text()
    traj.write_text('{"points": []}')
    with pytest.raises(EvaluationError, match=f"{traj.name}: not a sampling trajectory file"):
        load_run(run)
    traj.write_text(good)
    (run / "traj" / "other.json").write_text(good)
    with pytest.raises(EvaluationError, match="other.json has no video .*other.mp4"):
        load_run(run)
    (run / "traj" / "other.json").unlink()
    empty = tmp_path / "empty"
    (empty / "video").mkdir(parents=True)
    with pytest.raises(EvaluationError, match="baseline .* lacks 1 of the run's videos"):
        load_run(empty, requested_from=load_run(run))
    with pytest.raises(EvaluationError, match="unknown tracker"):
        evaluate(load_run(run), EvalConfig(tracker="sift"))


def test_frame_strip_size():
    frames = np.zeros((5, 10, 12, 3), np.uint8)
    path = np.stack([np.linspace(1, 10, 5), np.linspace(1, 8, 5)], axis=1)[None]
    strip = frame_strip(frames, path, path, [0, 2, 4], scale=2)
    assert strip.shape == (20, 3 * 24 + 2 * 4, 3) and strip.any()


def test_patch_params_in_config():
    assert EvalConfig().patch == PatchParams(radius=4.0, spacing=2.0)
    with pytest.raises(EvaluationError, match="patch radius"):
        EvalConfig(patch=PatchParams(spacing=0)).check()


def test_trackers_tolerate_blur_and_noise():
    """Generated videos are softer than the renders: blur (sigma 1.5 px) and noise (sd 8) keep both
    trackers within a pixel."""
    rng = np.random.default_rng(0)
    plain = [clip for clip in (random_clip("train", 3, index, CFG) for index in range(8))
             if clip.background_name in BACKGROUNDS]  # LK on outdoor scenes: see the lk test above
    for clip in plain[:2]:
        soft = np.stack([cv2.GaussianBlur(frame, (0, 0), 1.5) for frame in render_clip(clip)]).astype(float)
        frames = np.clip(soft + rng.normal(0, 8, soft.shape), 0, 255).astype(np.uint8)
        for sprite, truth in zip(clip.sprites, clip.centres):
            colour = TargetColour(sprite.color, sprite.name.split()[0], "test")
            positions, found = track_colour(frames, truth[0], colour, ColourParams())
            assert found.all() and np.linalg.norm(positions - truth, axis=1).mean() < 1.0
            positions, found = track_patch(len(frames), truth[0], lk_step(frames, EvalConfig().lk), PatchParams())
            assert found.all() and np.linalg.norm(positions - truth, axis=1).mean() < 1.0
