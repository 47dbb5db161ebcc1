"""Trajectories -> motion video: the conditioning input of Tora's trajectory extractor.

One path serves sampling and training; every step is a separate function:

    point files --read_point_file--> canvas points           list of (x, y) ints on the 256 x 256 canvas
                --resample---------> F canvas points         official rule or constant speed
                --to_video_pixels--> tracks                  [N, F, 2] int64 (x, y) video pixels
                --sparse_flow------> flow                    [F, H, W, 2] float32 (dx, dy)
                --blur_flow--------> blurred flow            99 x 99 Gaussian with peak 1
                --flow_to_rgb------> flow image              [F, 3, H, W] uint8 (Middlebury colours)
                --rgb_to_video-----> motion video            [1, 3, F, H, W] float in [-1, 1]

Sampling reads point files (``load_motion_video`` = ``load_tracks`` + ``tracks_to_video``); training
passes tracked keypoints as ``tracks`` (same rasterisation and blur) or dense RAFT flow straight to
``flow_to_rgb`` + ``rgb_to_video``.
``draw_trajectories`` renders the tracks over the output frames.

Point files: one ``x,y`` integer pair per line (spaces around the numbers allowed), in order of time,
on a ``canvas_width x canvas_height`` canvas, so 0 <= x < canvas_width and 0 <= y < canvas_height.
Blank (whitespace-only) lines are skipped wherever they are - a file is a sequence of points and a
blank line carries none - and error messages count physical lines, blank ones included.  At least 2
points are needed (the official code substituted an off-canvas (512, 512) and crashed later).

Resampling to F frames (``trajectory.resample``): "spread" (the default) follows the official rule
but sub-samples a file with more than F points evenly over its whole length; "official" is the
official rule, which *truncates* such files (F < n < 2F points: only the first F are used; a warning
gives the numbers); "uniform" moves at constant speed along the path.

Official numerics reproduced with ``resample: official`` (spec 1.4-1.6, golden "Trajectory rules"):
sub-sampling and *truncation* of long files, integer-truncated interpolation with an equal number of points per
segment, ``int()`` scaling to pixels, displacement written into frame i+1 at the position of frame
i, a 99 x 99 sigma-10 Gaussian normalised to centre 1 applied with ``cv2.filter2D`` semantics
(correlation, reflect-101 border repeated when the kernel is larger than the frame), and
torchvision's ``flow_to_image`` normalised over all frames at once.  The official *training* code
blurred with zero padding and normalised colours per 2-frame chunk (spec 7.3, 10.6); both are
settings (``blur_border``, ``flow_image_chunk_frames``).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torchvision.utils import flow_to_image

from .errors import ToraError
from .files import read_user_text
from tora.config import ConfigError, TrajectoryConfig

logger = logging.getLogger(__name__)

Point = tuple[int, int]  # (x, y)

# One "x,y" pair; each value is checked separately so the error can say which one is wrong.
_LINE = re.compile(r"^\s*([^,\s]+)\s*,\s*([^,\s]+)\s*$")
_INTEGER = re.compile(r"^[+-]?\d+$")

# Overlay (spec 1.10): official line colour/blend/circle; later trajectories get the next colours.
LINE_COLOURS = [(255, 1, 1), (1, 110, 255), (255, 200, 1), (190, 1, 255), (1, 200, 200), (255, 120, 1)]
LINE_THICKNESS = 2
LINE_OPACITY = 0.7  # pixel on a line = 0.3 * frame + 0.7 * line colour
POINT_COLOUR = (160, 230, 100)
POINT_RADIUS = 3


class TrajectoryError(ToraError, ValueError):
    """Unusable trajectory input; the message names the file and line."""


# ----------------------------------------------------------------------------------------------
# Point files
# ----------------------------------------------------------------------------------------------

def _parse_line(text: str, where: str) -> Point:
    match = _LINE.match(text)
    if match is None:
        raise TrajectoryError(f"{where}: expected one 'x,y' integer pair, got {text.strip()!r}")
    for name, value in zip("xy", match.groups()):
        if not _INTEGER.match(value):
            raise TrajectoryError(f"{where}: {name} = {value!r} is not an integer")
    x, y = (int(v) for v in match.groups())
    return x, y


def _check_on_canvas(point: Point, canvas_size: tuple[int, int], out_of_canvas: str, where: str) -> Point:
    """Return ``point``, or its clamped copy with ``out_of_canvas="clamp"``; otherwise raise."""
    width, height = canvas_size
    x, y = point
    if 0 <= x < width and 0 <= y < height:
        return point
    if out_of_canvas == "clamp":
        clamped = min(max(x, 0), width - 1), min(max(y, 0), height - 1)
        logger.warning("%s: point %s is outside the %dx%d canvas, clamped to %s",
                       where, point, width, height, clamped)
        return clamped
    if x < 0 or y < 0:
        raise TrajectoryError(f"{where}: negative value in point {point}; coordinates start at 0")
    raise TrajectoryError(f"{where}: point {point} is outside the {width}x{height} canvas "
                          f"(x must be < {width}, y < {height}; use out_of_canvas=clamp to clamp)")


def read_point_file(path: str | Path, canvas_size: tuple[int, int] = (256, 256),
                    out_of_canvas: str = "error") -> list[Point]:
    """Parse and validate a point file -> its (x, y) canvas points, at least 2.

    ``canvas_size`` is (width, height); ``out_of_canvas`` is "error" or "clamp" (with a warning).
    """
    path = Path(path)
    if not path.is_file():
        raise TrajectoryError(f"trajectory file not found: {path}")
    points = []
    for number, text in enumerate(read_user_text(path, "trajectory file").splitlines(), start=1):
        if not text.strip():
            continue
        where = f"{path}, line {number}"
        points.append(_check_on_canvas(_parse_line(text, where), canvas_size, out_of_canvas, where))
    if not points:
        raise TrajectoryError(f"{path}: empty trajectory file (expected one 'x,y' point per line)")
    if len(points) < 2:
        raise TrajectoryError(f"{path}: only one point; a trajectory needs at least 2")
    return points


# ----------------------------------------------------------------------------------------------
# Resampling to one point per frame, scaling to pixels
# ----------------------------------------------------------------------------------------------

def resample_official(points: Sequence[Point], num_frames: int) -> list[Point]:
    """The official rule (``read_points`` + ``process_points``), n points -> ``num_frames`` points.

    n > F: every (n // F)-th point, first F of them - files with F < n < 2F are *truncated*.
    n < F: the F - n missing points are spread over the n - 1 segments, (F - n) // (n - 1) each and
    one more for the first (F - n) % (n - 1) segments; the j-th of k points inserted between p and
    q is int(p + j / (k + 1) * (q - p)) per coordinate.  Equal counts per segment make the apparent
    speed proportional to the segment length.
    """
    if len(points) >= num_frames:
        return list(points[:: len(points) // num_frames][:num_frames])
    per_segment, extra = divmod(num_frames - len(points), len(points) - 1)
    resampled = []
    for index, (start, end) in enumerate(zip(points[:-1], points[1:])):
        inserted = per_segment + (index < extra)
        resampled.append(tuple(start))
        for j in range(1, inserted + 1):
            t = j / (inserted + 1)
            resampled.append(tuple(int(a + t * (b - a)) for a, b in zip(start, end)))
    resampled.append(tuple(points[-1]))
    return resampled


def resample_spread(points: Sequence[Point], num_frames: int) -> list[Point]:
    """The official rule without its truncation (the default): n <= F as :func:`resample_official`;
    n > F keeps F points at evenly spread indices round(i (n - 1) / (F - 1)), first and last included,
    so the whole path is followed and each point still stands for one moment in time."""
    if len(points) <= num_frames:
        return resample_official(points, num_frames)
    indices = np.rint(np.linspace(0, len(points) - 1, num_frames)).astype(int)
    return [tuple(points[i]) for i in indices]


def official_dropped_tail(points: Sequence[Point], num_frames: int) -> tuple[int, float]:
    """(points, fraction of the path length) the official rule leaves out at the end of a long file."""
    if len(points) <= num_frames:
        return 0, 0.0
    last_used = (num_frames - 1) * (len(points) // num_frames)
    xy = np.asarray(points, dtype=np.float64)
    steps = np.linalg.norm(np.diff(xy, axis=0), axis=1)  # [n - 1] segment lengths
    total = steps.sum()
    return len(points) - 1 - last_used, float(steps[last_used:].sum() / total) if total else 0.0


def resample_uniform(points: Sequence[Point], num_frames: int) -> list[Point]:
    """Constant speed: ``num_frames`` points equally spaced by arc length along the polyline, rounded.

    Uses every input point (no truncation); repeated points (pauses) take no time.
    """
    xy = np.asarray(points, dtype=np.float64)  # [n, 2]
    arc_length = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))])
    targets = np.linspace(0.0, arc_length[-1], num_frames)
    # Zero-length segments repeat arc_length values, but their end points coincide, so np.interp's
    # choice between them does not matter.
    resampled = np.stack([np.interp(targets, arc_length, xy[:, axis]) for axis in (0, 1)], axis=1)
    return [tuple(p) for p in np.rint(resampled).astype(int).tolist()]


RESAMPLERS = {"spread": resample_spread, "official": resample_official, "uniform": resample_uniform}


def to_video_pixels(points: Sequence[Point], canvas_size: tuple[int, int],
                    video_size_hw: tuple[int, int]) -> torch.Tensor:
    """Canvas points -> [len, 2] int64 (x, y) video pixels: x' = int(W x / canvas_w), y' likewise."""
    (canvas_width, canvas_height), (height, width) = canvas_size, video_size_hw
    # Integer floor division == the official int(W * x / canvas_w) for the validated x >= 0.
    return torch.tensor([(x * width // canvas_width, y * height // canvas_height) for x, y in points],
                        dtype=torch.int64)


def load_tracks(paths: Sequence[str | Path], num_frames: int, video_size_hw: tuple[int, int],
                cfg: TrajectoryConfig | None = None) -> torch.Tensor:
    """Point files (one trajectory each) -> tracks [N, F, 2] int64, (x, y) video pixels per frame."""
    cfg = cfg if cfg is not None else TrajectoryConfig()
    if not paths:
        raise TrajectoryError("no trajectory files given")
    if num_frames < 2:
        raise TrajectoryError(f"a trajectory video needs at least 2 frames, got num_frames={num_frames}")
    canvas_size = (cfg.canvas_width, cfg.canvas_height)
    resample = RESAMPLERS[cfg.resample]
    tracks = []
    for path in paths:
        points = read_point_file(path, canvas_size, cfg.out_of_canvas)
        if cfg.resample == "official":
            warn_if_truncated(path, points, num_frames)
        tracks.append(to_video_pixels(resample(points, num_frames), canvas_size, video_size_hw))
    return torch.stack(tracks)


_TRUNCATION_WARNED: set[tuple[str, int, int]] = set()  # (file, points, frames): say it once per run


def warn_if_truncated(path: str | Path, points: Sequence[Point], num_frames: int) -> None:
    """The official rule drops the end of files with more points than frames: say how much (once)."""
    dropped, fraction = official_dropped_tail(points, num_frames)
    if dropped and (str(path), len(points), num_frames) not in _TRUNCATION_WARNED:
        _TRUNCATION_WARNED.add((str(path), len(points), num_frames))
        logger.warning("%s: %d points for %d frames: trajectory.resample=official uses points 1-%d (step %d) "
                       "and drops the last %d points (%.0f%% of the path length); trajectory.resample=spread "
                       "(the default) keeps the whole path", path, len(points), num_frames,
                       len(points) - dropped, len(points) // num_frames, dropped, 100 * fraction)


# ----------------------------------------------------------------------------------------------
# Tracks -> sparse flow -> blurred flow
# ----------------------------------------------------------------------------------------------

def sparse_flow(tracks: torch.Tensor, video_size_hw: tuple[int, int]) -> torch.Tensor:
    """Tracks [N, F, 2] (x, y) pixels -> flow [F, H, W, 2] float32 of (dx, dy) displacements.

    The step from frame i to i+1 is written at the frame-i position in frame i+1; frame 0 stays
    zero.  Where tracks meet, the later one (higher N index) overwrites.
    """
    if tracks.ndim != 3 or tracks.shape[-1] != 2 or tracks.is_floating_point():
        raise TrajectoryError(f"tracks must be integer [N, F, 2] (x, y) pixels, got {tracks.dtype} "
                              f"{list(tracks.shape)}")
    num_frames, height, width = tracks.shape[1], *video_size_hw
    x, y = tracks[..., 0], tracks[..., 1]
    if (x < 0).any() or (x >= width).any() or (y < 0).any() or (y >= height).any():
        raise TrajectoryError(f"track positions must lie inside the {width}x{height} video "
                              f"(x in [{x.min()}, {x.max()}], y in [{y.min()}, {y.max()}])")
    flow = torch.zeros(num_frames, height, width, 2, dtype=torch.float32, device=tracks.device)
    next_frames = torch.arange(1, num_frames, device=tracks.device)
    for track in tracks:  # one at a time, so the overwrite order is defined
        flow[next_frames, track[:-1, 1], track[:-1, 0]] = (track[1:] - track[:-1]).float()
    return flow


def gaussian_profile(size: int, sigma: float) -> torch.Tensor:
    """g[d] = exp(-d^2 / (2 sigma^2)) for d = -(size // 2) ... size // 2, float64, g[centre] = 1."""
    if size < 1 or size % 2 == 0:
        raise ConfigError(f"blur kernel size must be odd and positive (trajectory.blur_kernel_size), got {size}")
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    return torch.exp(-offsets ** 2 / (2 * sigma ** 2))


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """The 2-D blur kernel [size, size] float64: K(dy, dx) = g(dy) g(dx), peak 1 (official 99, 10)."""
    profile = gaussian_profile(size, sigma)
    return torch.outer(profile, profile)


def _border_source(positions: torch.Tensor, length: int, border: str) -> torch.Tensor:
    """Index into 0 ... length-1 read at each (possibly outside) position; -1 = reads zero.

    reflect101 is OpenCV's BORDER_REFLECT_101 (... 2 1 | 0 1 2 ... n-1 | n-2 ...), reflected again
    and again when the kernel reaches further than the frame is long (the 99-wide kernel on 30 rows).
    """
    if border == "zeros":
        return torch.where((positions >= 0) & (positions < length), positions, -1)
    if border != "reflect101":
        raise ConfigError(f"unknown blur border {border!r} (trajectory.blur_border): use reflect101 or zeros")
    if length == 1:
        return torch.zeros_like(positions)
    period = 2 * (length - 1)
    positions = positions % period
    return torch.where(positions >= length, period - positions, positions)


def _blur_matrix(length: int, profile: torch.Tensor, border: str) -> torch.Tensor:
    """1-D correlation with ``profile`` along an axis of ``length``, border rule included, as a
    matrix M [length, length]: blurred[i] = sum_j M[i, j] x[j], M[i, j] = sum of the profile taps
    of output i that read source j (several, when reflections fold back onto the same pixel)."""
    size = len(profile)
    outputs = torch.arange(length, device=profile.device)[:, None].expand(length, size)
    taps = torch.arange(size, device=profile.device)[None, :]
    sources = _border_source(outputs + taps - size // 2, length, border)  # [length, size]
    inside = sources >= 0
    matrix = torch.zeros(length, length, dtype=profile.dtype, device=profile.device)
    return matrix.index_put_((outputs[inside], sources[inside]), profile.expand(length, size)[inside],
                             accumulate=True)


def blur_flow(flow: torch.Tensor, kernel_size: int = 99, sigma: float = 10.0,
              border: str = "reflect101") -> torch.Tensor:
    """Correlate every frame and channel of flow [F, H, W, 2] with ``gaussian_kernel``.

    A lone displacement becomes a Gaussian blob whose peak is the displacement.  The kernel is
    separable, K = g g^T, so each plane X [H, W] becomes  M_H X M_W^T  with the banded matrices of
    ``_blur_matrix`` (two matrix products: fast on CPU and GPU, any frame size).
    ``border``: "reflect101" (official sampling, ``cv2.filter2D``) or "zeros" (official training).
    """
    _, height, width, _ = flow.shape
    profile = gaussian_profile(kernel_size, sigma).to(device=flow.device)
    rows = _blur_matrix(height, profile, border).to(flow.dtype)  # [H, H]
    columns = _blur_matrix(width, profile, border).to(flow.dtype)  # [W, W]
    planes = flow.permute(0, 3, 1, 2)  # [F, 2, H, W]
    return (rows @ planes @ columns.T).permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------
# Flow -> RGB motion video
# ----------------------------------------------------------------------------------------------

def flow_to_rgb(flow: torch.Tensor, chunk_frames: int = 0) -> torch.Tensor:
    """Flow [F, H, W, 2] -> Middlebury colour image [F, 3, H, W] uint8 (torchvision ``flow_to_image``).

    Colours are normalised by the largest flow norm within each chunk of ``chunk_frames`` frames;
    0 = all frames together (official sampling), 2 = the official training.  Zero flow is white.
    """
    if chunk_frames < 0:
        raise ConfigError(f"flow image chunk size must be >= 0 (trajectory.flow_image_chunk_frames), "
                          f"got {chunk_frames}")
    frames = flow.permute(0, 3, 1, 2).float()  # [F, 2, H, W]
    chunks = frames.split(chunk_frames) if chunk_frames > 0 else [frames]
    return torch.cat([flow_to_image(chunk) for chunk in chunks])


def rgb_to_video(flow_image: torch.Tensor) -> torch.Tensor:
    """Flow image [F, 3, H, W] uint8 -> motion video [1, 3, F, H, W] float32 in [-1, 1] (VAE input)."""
    return (flow_image.float() / 255 * 2 - 1).permute(1, 0, 2, 3).unsqueeze(0)


@dataclass
class MotionVideo:
    """Everything derived from a set of tracks, by stage."""
    tracks: torch.Tensor  # [N, F, 2] int64 (x, y) video pixels
    flow: torch.Tensor  # [F, H, W, 2] float32 blurred (dx, dy)
    flow_image: torch.Tensor  # [F, 3, H, W] uint8
    video: torch.Tensor  # [1, 3, F, H, W] float32 in [-1, 1]


def tracks_to_video(tracks: torch.Tensor, video_size_hw: tuple[int, int],
                    cfg: TrajectoryConfig | None = None) -> MotionVideo:
    """Tracks [N, F, 2] -> sparse flow -> blur -> RGB -> motion video, with the settings of ``cfg``."""
    cfg = cfg if cfg is not None else TrajectoryConfig()
    flow = blur_flow(sparse_flow(tracks, video_size_hw), cfg.blur_kernel_size, cfg.blur_sigma, cfg.blur_border)
    flow_image = flow_to_rgb(flow, cfg.flow_image_chunk_frames)
    return MotionVideo(tracks, flow, flow_image, rgb_to_video(flow_image))


def load_motion_video(paths: Sequence[str | Path], num_frames: int, video_size_hw: tuple[int, int],
                      cfg: TrajectoryConfig | None = None) -> MotionVideo:
    """Point files (one trajectory each) -> ``MotionVideo`` of ``num_frames`` frames at ``video_size_hw``."""
    return tracks_to_video(load_tracks(paths, num_frames, video_size_hw, cfg), video_size_hw, cfg)


# ----------------------------------------------------------------------------------------------
# Overlay for output videos
# ----------------------------------------------------------------------------------------------

def draw_trajectories(frames: np.ndarray, tracks: torch.Tensor | np.ndarray) -> np.ndarray:
    """Draw every track over a copy of ``frames`` [F, H, W, 3] uint8 RGB; returns the new frames.

    Each track's whole polyline (thickness 2) is blended into every frame (line pixels become
    0.3 frame + 0.7 colour; track n gets ``LINE_COLOURS[n]``, the first the official red), then a
    filled radius-3 circle marks each track's position in the current frame.  ``tracks`` [N, F, 2]
    holds (x, y) pixels, one point per frame.
    """
    tracks = np.asarray(tracks, dtype=np.int32)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if tracks.ndim != 3 or tracks.shape[1:] != (len(frames), 2):
        raise ValueError(f"tracks must be [N, {len(frames)}, 2] (one point per frame), got {list(tracks.shape)}")
    lines = np.zeros(frames.shape[1:], dtype=np.uint8)  # [H, W, 3]
    for index, track in enumerate(tracks):
        cv2.polylines(lines, [track.reshape(-1, 1, 2)], isClosed=False,
                      color=LINE_COLOURS[index % len(LINE_COLOURS)], thickness=LINE_THICKNESS)
    on_line = lines.any(axis=-1)  # [H, W]
    out = frames.copy()
    blended = (1 - LINE_OPACITY) * frames[:, on_line] + LINE_OPACITY * lines[on_line]
    out[:, on_line] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    for frame, positions in zip(out, tracks.transpose(1, 0, 2)):  # positions [N, 2] at this frame
        for x, y in positions:
            cv2.circle(frame, (int(x), int(y)), POINT_RADIUS, POINT_COLOUR, thickness=-1)
    return out
