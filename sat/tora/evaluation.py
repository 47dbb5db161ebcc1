"""TrajError: how closely a generated video follows its requested trajectories (docs/EVALUATION.md).

    videos = load_run("samples/run")                      # video/, traj/, prompt/ of sample_video.py
    result = evaluate(videos, EvalConfig(tracker="colour"))
    baseline = evaluate(load_run("samples/base", requested_from=videos), cfg, colours=result.colours)
    print(markdown_table(result.summary, baseline.summary))

Protocol: each requested trajectory (``traj/<name>.json``: ``points_xy`` [N, F, 2] video pixels) is
tracked in the generated video from its first point by one tracker:

- ``colour``: the object's colour (from the caption, or read at the first point in frame 0; see
  ``resolve_colours``) is masked by an RGB distance threshold; each frame takes the connected
  component nearest to the previous position, its centroid is the position ("found" when there is
  one).  Within a pixel of the ground truth on the synthetic clips of ``tora.moving_objects``.
- ``lk``: a small grid of points (sized for a 96 px short side, scaled with the video) around the
  current position is tracked to the next frame with
  ``tora.tracking.track_points_lk`` (pyramidal Lucas-Kanade, forward-backward check); the position
  moves by the median displacement of the points that pass ("found" when one does).  The grid is
  laid anew every frame, so the tracker never runs out of points.  No weights; any video.
- ``raft``: the same grid moved by the project's RAFT flow (``tora.tracking``; user weights).

A frame where the tracker finds nothing keeps the last position (frame 0: the requested point), so
a lost object still counts its error.  Per trajectory: TrajError L1 = mean over frames of
|dx| + |dy| (px), L2 = mean end-point error (px), both also in % of the frame diagonal, the share of
frames found, and the per-frame L2 curve.  Videos average their trajectories; a run averages all
trajectories.  The baseline is the same prompts and seeds sampled without motion conditioning
(``sample_video.py --no-flow-injection``), scored against the motion run's requested trajectories.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np

from .errors import ToraError
from .moving_objects import PALETTE, caption_colours, read_ground_truth
from .tracking import LKParams, track_points_lk
from .video_io import read_mp4

TRACKERS = ("colour", "lk", "raft")
COLOUR_SOURCES = ("auto", "caption", "frame")
METRICS = ("l1", "l2", "l1_pct", "l2_pct", "found")


class EvaluationError(ToraError, ValueError):
    """An unusable sampling output or evaluation setting; the message names the file or setting."""


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ColourParams:
    # RGB distance below which a pixel has the object's colour.  A palette colour also requires the
    # pixel's nearest palette colour to be it (orange pixels are never "red"); see PALETTE.
    threshold: float = 90.0
    min_area: int = 3  # px: smaller components are noise
    # Where a trajectory's colour comes from: "caption" (k-th "<colour> <shape>" of the caption for
    # trajectory k), "frame" (median colour of a (2 sample_radius + 1)^2 patch at the first requested
    # point in frame 0, snapped to the nearest palette colour within `threshold`), "auto" (caption
    # when it names one palette colour per trajectory, else frame).
    colour_from: str = "auto"
    sample_radius: int = 1


@dataclass(frozen=True)
class PatchParams:
    """The grid of points the lk and raft trackers move: every `spacing` px within +-`radius` px."""
    radius: float = 4.0
    spacing: float = 2.0


@dataclass(frozen=True)
class RaftParams:
    model: str = "raft_large"  # tora.tracking.RAFT_VARIANTS
    weights: str = "ckpts/raft/raft_large_C_T_SKHT_V2-ff5fadd5.pth"
    iterations: int = 12
    min_side: int = 128  # RAFT needs H, W >= 128 (and multiples of 8): smaller videos are upscaled


@dataclass(frozen=True)
class EvalConfig:
    tracker: str = "colour"
    colour: ColourParams = field(default_factory=ColourParams)
    patch: PatchParams = field(default_factory=PatchParams)
    lk: LKParams = field(default_factory=lambda: LKParams(window_size=21))
    raft: RaftParams = field(default_factory=RaftParams)
    # The patch and the LK window are sized for a video whose short side is this many px; other
    # videos scale them with their short side (objects scale with the frame).
    reference_side: int = 96

    def check(self) -> None:
        if self.tracker not in TRACKERS:
            raise EvaluationError(f"unknown tracker {self.tracker!r}; choose one of {TRACKERS}")
        if self.colour.colour_from not in COLOUR_SOURCES:
            raise EvaluationError(f"unknown colour source {self.colour.colour_from!r}; choose one of {COLOUR_SOURCES}")
        if self.patch.radius < 0 or self.patch.spacing <= 0:
            raise EvaluationError(f"patch radius must be >= 0 and spacing > 0, got {self.patch}")
        if self.reference_side < 1:
            raise EvaluationError(f"reference_side must be >= 1, got {self.reference_side}")


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

@dataclass
class SampleVideo:
    """One video to score: ``requested`` float64 [N, F, 2] (x, y) px, one row per trajectory."""
    name: str
    video: Path
    caption: str
    requested: np.ndarray

    def frames(self) -> np.ndarray:
        """uint8 [F, H, W, 3]; F must match the requested trajectories."""
        frames = read_mp4(self.video)
        if len(frames) != self.requested.shape[1]:
            raise EvaluationError(f"{self.video}: {len(frames)} frames, but its trajectories have "
                                  f"{self.requested.shape[1]} points")
        return frames


def read_requested(path: Path) -> np.ndarray:
    """``traj/<name>.json`` of a sampling run (``points_xy`` [N, F, 2]) -> float64 [N, F, 2]."""
    try:
        points = np.asarray(json.loads(path.read_text())["points_xy"], np.float64)
    except (ValueError, KeyError, TypeError) as err:
        raise EvaluationError(f"{path}: not a sampling trajectory file ({type(err).__name__}: {err}); "
                              f"expected {{'points_xy': [[[x, y] per frame] per trajectory]}}") from None
    if points.ndim != 3 or points.shape[2] != 2 or points.shape[1] < 2:
        raise EvaluationError(f"{path}: points_xy must be [trajectories, frames >= 2, 2], got {list(points.shape)}")
    return points


def _caption(run_dir: Path, name: str) -> str:
    path = run_dir / "prompt" / f"{name}.txt"
    return path.read_text().strip() if path.is_file() else ""


def load_run(run_dir: str | Path, requested_from: Sequence[SampleVideo] | None = None) -> list[SampleVideo]:
    """The videos of a sampling output folder with their requested trajectories, sorted by name.

    Without ``requested_from`` every ``traj/<name>.json`` with its ``video/<name>.mp4``.  With it
    (a baseline run, which has no traj/ folder), the same names' videos of this folder, scored
    against the given videos' trajectories."""
    run_dir = Path(run_dir)
    if requested_from is not None:
        videos = [SampleVideo(v.name, run_dir / "video" / f"{v.name}.mp4", _caption(run_dir, v.name) or v.caption,
                              v.requested) for v in requested_from]
        missing = [v.name for v in videos if not v.video.is_file()]
        if missing:
            raise EvaluationError(f"baseline {run_dir} lacks {len(missing)} of the run's videos, e.g. "
                                  f"video/{missing[0]}.mp4 (sample the same prompts and seeds)")
        return videos
    traj_files = sorted((run_dir / "traj").glob("*.json"))
    if not traj_files:
        raise EvaluationError(f"{run_dir} has no traj/*.json (a sample_video.py output folder sampled "
                              f"with --point_path)")
    videos = []
    for path in traj_files:
        video = run_dir / "video" / f"{path.stem}.mp4"
        if not video.is_file():
            raise EvaluationError(f"{path} has no video {video}")
        videos.append(SampleVideo(path.stem, video, _caption(run_dir, path.stem), read_requested(path)))
    return videos


def load_clips(data_dir: str | Path) -> list[SampleVideo]:
    """A clip folder of ``tora.moving_objects`` (videos/ + ground truth + labels/), its true paths
    as the "requested" ones: scoring it measures the tracker's own error."""
    data_dir = Path(data_dir)
    clips = sorted((data_dir / "videos").glob("*.mp4"))
    if not clips:
        raise EvaluationError(f"{data_dir} has no videos/*.mp4")
    videos = []
    for clip in clips:
        truth = read_ground_truth(clip)
        label = data_dir / "labels" / f"{clip.stem}.txt"
        videos.append(SampleVideo(clip.stem, clip, label.read_text().strip() if label.is_file() else "",
                                  np.stack([obj["centres"] for obj in truth["objects"]])))
    return videos


# ----------------------------------------------------------------------------------------------
# Colour tracker
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetColour:
    rgb: tuple[int, int, int]
    palette_name: Optional[str]  # set: the nearest-palette rule applies
    source: str  # "caption" or "frame"


def _palette_colour(rgb: np.ndarray, threshold: float) -> Optional[str]:
    distances = {name: float(np.linalg.norm(rgb - np.array(value))) for name, value in PALETTE.items()}
    name = min(distances, key=distances.get)
    return name if distances[name] < threshold else None


def colour_at(frame: np.ndarray, point: np.ndarray, params: ColourParams) -> TargetColour:
    """The colour at a point of a frame [H, W, 3]: median of a small patch, snapped to the palette."""
    height, width, _ = frame.shape
    x, y = (int(round(min(max(v, 0), size - 1))) for v, size in zip(point, (width, height)))
    r = params.sample_radius
    patch = frame[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1].reshape(-1, 3)
    rgb = np.median(patch, axis=0)
    name = _palette_colour(rgb, params.threshold)
    return TargetColour(PALETTE[name] if name else tuple(int(v) for v in rgb), name, "frame")


def resolve_colours(video: SampleVideo, first_frame: np.ndarray, params: ColourParams) -> list[TargetColour]:
    """One target colour per trajectory of ``video`` (see ColourParams.colour_from)."""
    named = caption_colours(video.caption)
    count = len(video.requested)
    use_caption = params.colour_from == "caption" or (params.colour_from == "auto" and len(named) == count)
    if use_caption:
        if len(named) != count:
            raise EvaluationError(f"{video.name}: the caption names {len(named)} palette colours "
                                  f"({named}) for {count} trajectories: {video.caption!r}")
        return [TargetColour(PALETTE[name], name, "caption") for name in named]
    return [colour_at(first_frame, track[0], params) for track in video.requested]


def colour_mask(frame: np.ndarray, colour: TargetColour, threshold: float) -> np.ndarray:
    """bool [H, W]: pixels within ``threshold`` (RGB distance) of the colour and, for a palette
    colour, nearer to it than to any other palette colour."""
    pixels = frame.astype(np.float32)
    mask = _squared_distance(pixels, np.array(colour.rgb, np.float32)) < threshold ** 2
    if colour.palette_name is not None and mask.any():
        palette = np.array(list(PALETTE.values()), np.float32)  # [P, 3]
        nearest = np.argmin(_squared_distance(pixels[mask][:, None, :], palette), axis=-1)  # [M]
        mask[mask] = nearest == list(PALETTE).index(colour.palette_name)
    return mask


def _squared_distance(pixels: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Squared RGB distance [...] of pixels [..., 3] to a colour [3] (or [..., P] to colours [P, 3])."""
    return ((pixels - colour) ** 2).sum(axis=-1)


def nearest_component(mask: np.ndarray, position: np.ndarray, min_area: int) -> Optional[np.ndarray]:
    """Centroid (x, y) of the 8-connected component of ``mask`` whose centroid is nearest to
    ``position``, ignoring components under ``min_area`` px; None when there is none."""
    count, _, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = [k for k in range(1, count) if stats[k, cv2.CC_STAT_AREA] >= min_area]
    if not keep:
        return None
    candidates = centroids[keep]
    return candidates[np.argmin(np.linalg.norm(candidates - position, axis=1))]


def track_colour(frames: np.ndarray, start: np.ndarray, colour: TargetColour,
                 params: ColourParams) -> tuple[np.ndarray, np.ndarray]:
    """Frames [F, H, W, 3], start (x, y) -> positions float64 [F, 2], found bool [F]."""
    position = np.asarray(start, np.float64)
    positions, found = np.empty((len(frames), 2)), np.zeros(len(frames), bool)
    for t, frame in enumerate(frames):
        centroid = nearest_component(colour_mask(frame, colour, params.threshold), position, params.min_area)
        if centroid is not None:
            position, found[t] = centroid, True
        positions[t] = position
    return positions, found


# ----------------------------------------------------------------------------------------------
# Patch trackers (lk, raft)
# ----------------------------------------------------------------------------------------------

# step(t, points [M, 2]) -> (points in frame t+1 [M, 2], passed [M] bool)
Step = Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]


def patch_grid(centre: np.ndarray, params: PatchParams) -> np.ndarray:
    """[M, 2] (x, y): a square grid every ``spacing`` px within +-``radius`` px of the centre."""
    offsets = np.arange(-params.radius, params.radius + 1e-9, params.spacing)
    grid_x, grid_y = np.meshgrid(offsets, offsets)
    return np.asarray(centre, np.float64) + np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)


def track_patch(num_frames: int, start: np.ndarray, step: Step, params: PatchParams
                ) -> tuple[np.ndarray, np.ndarray]:
    """Move a fresh grid around the current position one frame at a time by the median
    displacement of its passing points -> positions float64 [F, 2], found bool [F] (frame 0: True)."""
    position = np.asarray(start, np.float64)
    positions, found = np.empty((num_frames, 2)), np.zeros(num_frames, bool)
    positions[0], found[0] = position, True
    for t in range(num_frames - 1):
        grid = patch_grid(position, params)
        moved, passed = step(t, grid)
        if passed.any():
            position = position + np.median(moved[passed] - grid[passed], axis=0)
            found[t + 1] = True
        positions[t + 1] = position
    return positions, found


def lk_step(frames: np.ndarray, params: LKParams) -> Step:
    def step(t: int, points: np.ndarray):
        tracks, visible = track_points_lk(frames[t:t + 2], points, params=params)
        return tracks[1].astype(np.float64), visible[1]
    return step


def raft_step(frames: np.ndarray, params: RaftParams, device: str = "cpu") -> Step:
    """RAFT flows of the whole video (upscaled to RAFT's minimum size), looked up bilinearly."""
    import torch

    from .config import MotionFromVideoConfig
    from .tracking import RAFT_VARIANTS, load_raft, raft_flows, track_points

    if params.model not in RAFT_VARIANTS:
        raise EvaluationError(f"unknown RAFT model {params.model!r} (--raft-model); choose one of {list(RAFT_VARIANTS)}")
    if not Path(params.weights).is_file():
        url = RAFT_VARIANTS[params.model][1].url
        raise EvaluationError(f"tracker raft: RAFT weights not found at {params.weights} (--raft-weights). "
                              f"Download torchvision's {params.model} weights from {url} and pass their path; "
                              f"trackers colour and lk need no weights")
    cfg = MotionFromVideoConfig(raft_model=params.model, raft_weights=params.weights,
                                raft_iterations=params.iterations, tracking="subpixel")
    raft = load_raft(cfg, device)
    height, width = frames.shape[1:3]
    scale = max(1.0, params.min_side / min(height, width))
    size = (math.ceil(height * scale / 8) * 8, math.ceil(width * scale / 8) * 8)
    factor = np.array([size[1] / width, size[0] / height])  # (x, y) upscaling
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1  # [F, 3, H, W] in [-1, 1]
    video = torch.nn.functional.interpolate(video, size=size, mode="bilinear", align_corners=False)
    flows = raft_flows(raft, video, cfg).cpu()  # [F-1, H', W', 2] upscaled px

    def step(t: int, points: np.ndarray):
        scaled = torch.from_numpy((points + 0.5) * factor - 0.5).float()
        moved = track_points(flows[t:t + 1], scaled, "subpixel")[1].numpy()
        return (moved + 0.5) / factor - 0.5, np.ones(len(points), bool)
    return step


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def trajectory_error(requested: np.ndarray, tracked: np.ndarray, found: np.ndarray,
                     size_hw: tuple[int, int]) -> dict:
    """Requested and tracked [F, 2] px, found [F] -> TrajError of one trajectory:
    l1 = mean |dx| + |dy|, l2 = mean sqrt(dx^2 + dy^2) (px), *_pct = the same in % of the frame
    diagonal, found = share of frames found, curve = per-frame L2 [F] (px)."""
    delta = np.asarray(tracked, np.float64) - np.asarray(requested, np.float64)
    per_frame = np.linalg.norm(delta, axis=1)
    diagonal = math.hypot(*size_hw)
    l1, l2 = float(np.abs(delta).sum(axis=1).mean()), float(per_frame.mean())
    return {"l1": l1, "l2": l2, "l1_pct": 100 * l1 / diagonal, "l2_pct": 100 * l2 / diagonal,
            "found": float(np.mean(found)), "curve": per_frame.tolist()}


def summarise(scores: Sequence[dict]) -> dict:
    """Mean of every metric over trajectories, the mean per-frame curve, counts, the worst
    trajectory's l2 (px, %) and the lowest found share; the means also per number of objects in
    the video (``by_num_objects``)."""
    if not scores:
        raise EvaluationError("nothing to summarise: no trajectory was scored")
    summary = {key: float(np.mean([s[key] for s in scores])) for key in METRICS}
    summary["worst_l2"] = float(max(s["l2"] for s in scores))  # per-object targets: every trajectory
    summary["worst_l2_pct"] = float(max(s["l2_pct"] for s in scores))
    summary["min_found"] = float(min(s["found"] for s in scores))
    summary["curve"] = np.mean([s["curve"] for s in scores], axis=0).tolist()
    summary["trajectories"] = len(scores)
    summary["videos"] = len({s["video"] for s in scores})
    counts = sorted({s["num_objects"] for s in scores})
    if len(counts) > 1:
        summary["by_num_objects"] = {str(n): {key: float(np.mean([s[key] for s in scores if s["num_objects"] == n]))
                                              for key in METRICS} for n in counts}
    return summary


def ratios(motion: dict, baseline: dict) -> dict:
    """with motion / without motion, per error metric (lower is better; < 1 = motion helps)."""
    return {key: motion[key] / baseline[key] if baseline[key] > 0 else math.inf
            for key in ("l1", "l2", "l1_pct", "l2_pct")}


# ----------------------------------------------------------------------------------------------
# Running a tracker over videos
# ----------------------------------------------------------------------------------------------

@dataclass
class Result:
    """``scores``: one dict per trajectory (trajectory_error + video, index, num_objects, tracked
    [F, 2], found_frames [F], colour); ``colours``: per video name the colours used (reuse for the baseline)."""
    scores: list[dict]
    summary: dict
    colours: dict[str, list[TargetColour]]


def track_video(video: SampleVideo, frames: np.ndarray, cfg: EvalConfig,
                colours: Optional[list[TargetColour]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(positions [F, 2], found [F]) per requested trajectory of one video."""
    if cfg.tracker == "colour":
        return [track_colour(frames, track[0], colour, cfg.colour) for track, colour in zip(video.requested, colours)]
    scale = min(frames.shape[1:3]) / cfg.reference_side
    patch = replace(cfg.patch, radius=cfg.patch.radius * scale, spacing=cfg.patch.spacing * scale)
    if cfg.tracker == "lk":
        window = max(3, int(round(cfg.lk.window_size * scale)) // 2 * 2 + 1)  # odd
        step = lk_step(frames, replace(cfg.lk, window_size=window))
    else:
        step = raft_step(frames, cfg.raft)
    return [track_patch(len(frames), track[0], step, patch) for track in video.requested]


def evaluate(videos: Sequence[SampleVideo], cfg: EvalConfig,
             colours: Optional[dict[str, list[TargetColour]]] = None) -> Result:
    """Track and score every trajectory of ``videos``.  ``colours`` (colour tracker): the colours
    of an earlier result (the baseline reuses the motion run's), else resolved per video."""
    cfg.check()
    scores, used = [], {}
    for video in videos:
        frames = read_and_check(video)
        if cfg.tracker == "colour":
            used[video.name] = (colours or {}).get(video.name) or resolve_colours(video, frames[0], cfg.colour)
        for index, (positions, found) in enumerate(track_video(video, frames, cfg, used.get(video.name))):
            score = trajectory_error(video.requested[index], positions, found, frames.shape[1:3])
            score.update(video=video.name, index=index, num_objects=len(video.requested),
                         tracked=positions.tolist(), found_frames=found.tolist(),
                         colour=asdict(used[video.name][index]) if video.name in used else None)
            scores.append(score)
    return Result(scores, summarise(scores), used)


def read_and_check(video: SampleVideo) -> np.ndarray:
    frames = video.frames()
    height, width = frames.shape[1:3]
    x, y = video.requested[..., 0], video.requested[..., 1]
    if (x < 0).any() or (y < 0).any() or (x > width - 1).any() or (y > height - 1).any():
        raise EvaluationError(f"{video.name}: requested points outside the {width}x{height} video")
    return frames


def per_video(scores: Sequence[dict]) -> dict[str, dict]:
    """Per video: the mean of each metric over its trajectories and the worst trajectory's l2."""
    names = sorted({s["video"] for s in scores})
    table = {}
    for name in names:
        own = [s for s in scores if s["video"] == name]
        table[name] = {key: float(np.mean([s[key] for s in own])) for key in METRICS}
        table[name].update(worst_l2=max(s["l2"] for s in own), trajectories=len(own))
    return table


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------

ROWS = (("TrajError L1 (px)", "l1"), ("TrajError L2 / EPE (px)", "l2"), ("L1 (% of diagonal)", "l1_pct"),
        ("L2 (% of diagonal)", "l2_pct"), ("worst trajectory L2 (px)", "worst_l2"),
        ("worst trajectory L2 (% of diagonal)", "worst_l2_pct"), ("frames found (%)", "found"),
        ("fewest frames found in a trajectory (%)", "min_found"))


def _cell(summary: dict, key: str) -> str:
    return f"{100 * summary[key]:.1f}" if key in ("found", "min_found") else f"{summary[key]:.2f}"


def markdown_table(motion: dict, baseline: Optional[dict] = None, label: str = "with motion") -> str:
    """The summary table: one row per metric; with a baseline also its column and the ratio
    (with motion / without motion) of the error metrics.  ``label`` heads the first column."""
    if baseline is None:
        lines = [f"| metric | {label} |", "|---|---:|"]
        lines += [f"| {label} | {_cell(motion, key)} |" for label, key in ROWS]
        lines.append(f"| trajectories (videos) | {motion['trajectories']} ({motion['videos']}) |")
        return "\n".join(lines)
    ratio = ratios(motion, baseline)
    lines = [f"| metric | {label} | without motion | ratio |", "|---|---:|---:|---:|"]
    for label, key in ROWS:
        shown = f"{ratio[key]:.3f}" if key in ratio else ""
        lines.append(f"| {label} | {_cell(motion, key)} | {_cell(baseline, key)} | {shown} |")
    lines.append(f"| trajectories (videos) | {motion['trajectories']} ({motion['videos']}) | "
                 f"{baseline['trajectories']} ({baseline['videos']}) | |")
    return "\n".join(lines)


def video_table(motion: dict[str, dict], baseline: Optional[dict[str, dict]] = None) -> str:
    """Per-video markdown table of L2 (px, %), worst L2 and found share (and the baseline's L2)."""
    lines = ["| video | L2 (px) | L2 (%) | worst L2 (px) | found (%) |" + (" L2 without motion (px) |" if baseline else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if baseline else "")]
    for name, row in motion.items():
        line = f"| {name} | {row['l2']:.2f} | {row['l2_pct']:.2f} | {row['worst_l2']:.2f} | {100 * row['found']:.1f} |"
        lines.append(line + (f" {baseline[name]['l2']:.2f} |" if baseline else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Pictures: frame strips and error curves
# ----------------------------------------------------------------------------------------------

REQUESTED_COLOURS = [(255, 1, 1), (1, 110, 255), (255, 200, 1), (190, 1, 255), (1, 200, 200), (255, 120, 1)]
TRACKED_COLOUR = (255, 255, 255)
STRIP_GAP = 4  # px of black between the frames of a strip


def strip_frames(num_frames: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly from the first to the last frame."""
    return sorted({round(k * (num_frames - 1) / max(count - 1, 1)) for k in range(count)})


def frame_strip(frames: np.ndarray, requested: np.ndarray, tracked: np.ndarray, indices: Sequence[int],
                scale: int = 2) -> np.ndarray:
    """The frames at ``indices`` side by side, upscaled ``scale`` x (nearest), with each requested
    path (coloured line, ring at the frame's requested point) and the tracked path so far (white
    line, dot at the tracked point).  frames [F, H, W, 3] uint8, requested/tracked [N, F, 2] px.
    Returns uint8 [scale H, K scale W + (K - 1) STRIP_GAP, 3] for K indices."""
    tiles = []
    for t in indices:
        tile = np.ascontiguousarray(np.repeat(np.repeat(frames[t], scale, axis=0), scale, axis=1))
        for n, (want, got) in enumerate(zip(requested, tracked)):
            colour = REQUESTED_COLOURS[n % len(REQUESTED_COLOURS)]
            cv2.polylines(tile, [_pixels(want, scale)], False, colour, 1, cv2.LINE_AA)
            cv2.polylines(tile, [_pixels(got[:t + 1], scale)], False, TRACKED_COLOUR, 1, cv2.LINE_AA)
            cv2.circle(tile, tuple(_pixels(want[t:t + 1], scale)[0]), 2 * scale, colour, 1, cv2.LINE_AA)
            cv2.circle(tile, tuple(_pixels(got[t:t + 1], scale)[0]), scale, TRACKED_COLOUR, -1, cv2.LINE_AA)
        tiles += [tile, np.zeros((tile.shape[0], STRIP_GAP, 3), np.uint8)]
    return np.concatenate(tiles[:-1], axis=1)


def _pixels(points: np.ndarray, scale: int) -> np.ndarray:
    """(x, y) px [P, 2] -> int32 [P, 2] positions in a ``scale`` x upscaled image (pixel centres)."""
    return np.rint((np.asarray(points) + 0.5) * scale - 0.5).astype(np.int32)


def labelled_rows(rows: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """Stack strips [h, w, 3] vertically, each under a 20 px caption bar with its label."""
    out = []
    for label, image in rows:
        bar = np.zeros((20, image.shape[1], 3), np.uint8)
        cv2.putText(bar, label, (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        out += [bar, image]
    return np.concatenate(out, axis=0)


def write_strips(out_dir: Path, motion: Result, videos: Sequence[SampleVideo], baseline: Optional[Result] = None,
                 baseline_videos: Sequence[SampleVideo] = (), count: int = 4, frames_per_strip: int = 5,
                 scale: int = 2) -> list[Path]:
    """``<out_dir>/<name>.png`` for the first ``count`` videos: the motion run's strip, and under
    it the baseline's (same requested paths), each with its tracked path."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    by_name = {v.name: v for v in baseline_videos}
    written = []
    for video in list(videos)[:count]:
        rows = [("with motion", video, motion)]
        if baseline is not None and video.name in by_name:
            rows.append(("without motion", by_name[video.name], baseline))
        images = []
        for label, sample, result in rows:
            frames = sample.frames()
            tracked = np.array([s["tracked"] for s in result.scores if s["video"] == sample.name])
            l2 = np.mean([s["l2"] for s in result.scores if s["video"] == sample.name])
            strip = frame_strip(frames, sample.requested, tracked, strip_frames(len(frames), frames_per_strip), scale)
            images.append((f"{label}: L2 {l2:.1f} px", strip))
        path = out_dir / f"{video.name}.png"
        Image.fromarray(labelled_rows(images)).save(path)
        written.append(path)
    return written


def plot_curves(path: Path, curves: dict[str, Sequence[float]], title: str = "TrajError per frame") -> Path:
    """PNG of per-frame L2 curves (label -> [F] px), e.g. with and without motion."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for label, curve in curves.items():
        axes.plot(range(len(curve)), curve, label=label)
    axes.set(xlabel="frame", ylabel="L2 error (px)", title=title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_error_vs_step(path: Path, series: dict[str, Sequence[tuple[int, float]]],
                       ylabel: str = "TrajError L2 (% of diagonal)") -> Path:
    """PNG of TrajError against training step: label -> [(step, value)] (one line per stage)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for label, points in series.items():
        steps, values = zip(*points)
        axes.plot(steps, values, marker="o", label=label)
    axes.set(xlabel="training step", ylabel=ylabel)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported only when a plot is asked for)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
