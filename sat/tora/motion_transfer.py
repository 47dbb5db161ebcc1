"""Motion transfer: tracks from a reference clip, as editable tracks on the trajectory canvas.

    clip ──read_clip──► frames [F, H, W, 3] uint8
         start points [N, 2] (x, y) clip pixels, clicked or ``moving_start_points``
         ──tora.tracking.track_points_lk──► positions [F, N, 2], visible [F, N]
         ──tracks.tracks_from_arrays──► N tracks, one canvas point per clip frame

The tracker is the project's weight-free one (``tora.tracking.track_points_lk``, pyramidal Lucas-Kanade),
so no RAFT weights are needed.  The clip's frames map onto the whole generated video ("as drawn" timing
spreads the clip's frames evenly over the output frames); the canvas is normalised, so a clip of another
aspect ratio is stretched onto the model's frame, as any point file is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .tracks import Track, TrackError, tracks_from_arrays

Tracker = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def point_tracker() -> Tracker:
    """``tora.tracking.track_points_lk(frames [F, H, W, 3] uint8, points [N, 2]) -> (tracks [F, N, 2],
    visible [F, N])``, or a clear error when this checkout lacks it."""
    from . import tracking

    tracker = getattr(tracking, "track_points_lk", None)
    if tracker is None:
        raise TrackError("motion transfer needs the point tracker tora.tracking.track_points_lk, "
                         "which this checkout does not have yet")
    return tracker


def read_clip(path: str | Path, max_frames: int = 0) -> np.ndarray:
    """A video file -> frames [F, H, W, 3] uint8 RGB (the first ``max_frames``; 0 = all), at least 2."""
    import imageio.v2 as imageio

    path = Path(path)
    frames = []
    try:
        with imageio.get_reader(path, format="FFMPEG") as reader:
            for frame in reader:
                frames.append(np.asarray(frame)[..., :3])
                if max_frames and len(frames) >= max_frames:
                    break
    except Exception as err:  # imageio/ffmpeg raise several types for undecodable input
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrackError(f"cannot decode the video {path.name}: {first_line}") from None
    if len(frames) < 2:
        raise TrackError(f"the video {path.name} has {len(frames)} decodable frame(s); motion transfer needs at least 2")
    return np.stack(frames).astype(np.uint8)


def parse_points(texts: list[str], size_hw: tuple[int, int], source: str = "--at") -> np.ndarray:
    """["x,y", ...] clip pixels -> [N, 2] float32, each inside the clip."""
    height, width = size_hw
    points = []
    for text in texts:
        try:
            x, y = (float(v) for v in text.split(","))
        except ValueError:
            raise TrackError(f"{source} {text!r}: expected x,y (pixels of the clip)") from None
        if not (0 <= x < width and 0 <= y < height):
            raise TrackError(f"{source} {text!r}: outside the {width}x{height} clip")
        points.append((x, y))
    if not points:
        raise TrackError(f"{source}: no start points given")
    return np.asarray(points, dtype=np.float32)


def moving_start_points(frames: np.ndarray, count: int, tracker: Tracker, grid_step: int = 8,
                        min_motion_px: float = 2.0, agree_px: float = 2.0) -> np.ndarray:
    """``count`` start points [count, 2] where the clip moves, one per distinct motion first.

    A grid of candidates (every ``grid_step`` pixels) is tracked.  Candidates kept: visible in every
    frame and travelling at least ``min_motion_px``.  They are ranked by how many grid neighbours move
    with them (displacements within ``agree_px`` in every frame: a point inside a rigidly moving
    region, not one drifting at an edge), then by distance travelled.  The first pass takes a point
    only when its motion differs from every point taken (one point per object); a second pass fills
    up with points at least 2 grid steps from the others.
    """
    if count < 1:
        raise TrackError(f"the number of points must be >= 1, got {count}")
    height, width = frames.shape[1:3]
    ys, xs = np.mgrid[grid_step // 2:height:grid_step, grid_step // 2:width:grid_step]
    candidates = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)  # [M, 2]
    positions, visible = tracker(frames, candidates)  # [F, M, 2], [F, M]
    positions, visible = np.asarray(positions, dtype=np.float64), np.asarray(visible, dtype=bool)
    travel = np.linalg.norm(np.diff(positions, axis=0), axis=-1).sum(axis=0)  # [M]
    moving = np.flatnonzero(visible.all(axis=0) & (travel >= min_motion_px))
    if len(moving) == 0:
        raise TrackError(f"nothing in the clip moves by {min_motion_px} px or more while staying tracked; "
                         "click start points instead")
    displacement = positions[:, moving] - positions[:1, moving]  # [F, K, 2]

    def differs(a: int, b: int) -> bool:  # indices into ``moving``
        return np.linalg.norm(displacement[:, a] - displacement[:, b], axis=-1).max() > agree_px

    near = np.linalg.norm(candidates[moving][:, None] - candidates[moving][None], axis=-1) <= 1.5 * grid_step
    support = [sum(not differs(i, j) for j in np.flatnonzero(near[i]) if j != i) for i in range(len(moving))]
    order = sorted(range(len(moving)), key=lambda i: (-support[i], -travel[moving[i]]))
    chosen: list[int] = []
    for distinct in (True, False):
        for i in order:
            if len(chosen) == count:
                break
            far = all(np.linalg.norm(candidates[moving[i]] - candidates[moving[c]]) >= 2 * grid_step for c in chosen)
            if i not in chosen and far and (not distinct or all(differs(i, c) for c in chosen)):
                chosen.append(i)
    return candidates[moving[chosen]]


def transfer_tracks(frames: np.ndarray, starts: np.ndarray, tracker: Tracker,
                    canvas_size: tuple[int, int] = (256, 256), source: str = "clip") -> list[Track]:
    """Track ``starts`` [N, 2] (clip pixels) through ``frames`` -> N tracks, one canvas point per frame."""
    positions, visible = tracker(frames, np.asarray(starts, dtype=np.float32))
    tracks = tracks_from_arrays(np.asarray(positions), np.asarray(visible), frames.shape[1:3], canvas_size, source)
    for track, start in zip(tracks, np.asarray(starts).tolist()):
        track.name = f"from {source} at ({start[0]:.0f}, {start[1]:.0f})"
        track.extra = {"source": source, "start_pixel": [float(v) for v in start]}
    return tracks
