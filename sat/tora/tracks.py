"""Drawn tracks: the geometry, timing and file formats behind the trajectory editor (``sat/app.py``).

Three coordinate systems, all (x, y) with x = column:

    editor pixels   floats on the drawing canvas shown in the browser (any size, the video's aspect ratio)
    canvas points   ints on the trajectory canvas of the point files (``trajectory.canvas_width/height``,
                    256 x 256 by default, whatever the video's aspect ratio: x and y scale separately)
    video pixels    ints on the model's frames (``trajectory.to_video_pixels``: x' = x W // canvas_w)

A drawn track is the list of points the mouse recorded (clicks, or freehand samples taken at a steady
rate while the button is down).  ``time_track`` turns it into one canvas point per frame:

    as_drawn   every recorded point takes the same time (freehand speed follows the hand, each click
               is one step)
    uniform    constant speed along the path (``trajectory.resample_uniform``)
    ease       ease-in/out along the path: slow start and end, fastest in the middle

A point file with exactly one point per frame is what the app exports and samples from: the official
resampling rule keeps such a file unchanged, so ``sample_video.py --point_path`` sees the same tracks.

Other trajectory-control systems exchange tracks as ``tracks.npy`` [frames, points, 2] float (x, y)
pixels of some video size and ``visibility.npy`` [frames, points] bool; ``tracks_from_arrays`` and
``arrays_from_tracks`` convert (hidden frames are filled by linear interpolation between visible ones).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .trajectory import Point, TrajectoryError, read_point_file, resample_uniform, to_video_pixels

TIMING_MODES = ("as_drawn", "uniform", "ease")
EASE_RESOLUTION = 4096  # dense arc-length samples the ease timing picks from (sub-canvas-pixel spacing)
JSON_FORMAT = "tora-tracks/1"


class TrackError(TrajectoryError):
    """Unusable drawn or imported tracks; the message names the track (1-based) or the file."""


@dataclass
class Track:
    """One object's drawn path: canvas points in drawing order; ``static`` = stays at its first point."""
    points: list[Point]
    static: bool = False
    name: str = ""
    extra: dict = field(default_factory=dict)  # e.g. the source a motion-transfer track came from


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------

def editor_to_canvas(xy: np.ndarray | Sequence, editor_size: tuple[float, float],
                     canvas_size: tuple[int, int] = (256, 256)) -> list[Point]:
    """Editor pixels [n, 2] (floats; editor_size = (width, height)) -> canvas points.

    The editor's [0, width) maps onto the canvas's [0, canvas_w): a point lands in the canvas cell
    under it (floor); points dragged past the border are clamped onto the canvas.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    scale = np.array([canvas_size[0] / editor_size[0], canvas_size[1] / editor_size[1]])
    cells = np.floor(xy * scale).astype(np.int64)
    cells = np.clip(cells, 0, np.array(canvas_size) - 1)
    return [tuple(p) for p in cells.tolist()]


def canvas_to_editor(points: Sequence[Point], editor_size: tuple[float, float],
                     canvas_size: tuple[int, int] = (256, 256)) -> np.ndarray:
    """Canvas points -> editor pixels [n, 2] float: the centre of each canvas cell (inverse of
    ``editor_to_canvas``)."""
    cells = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (cells + 0.5) * np.array([editor_size[0] / canvas_size[0], editor_size[1] / canvas_size[1]])


def video_to_canvas(xy: np.ndarray | Sequence, video_size_hw: tuple[int, int],
                    canvas_size: tuple[int, int] = (256, 256)) -> list[Point]:
    """Video pixels [n, 2] (floats allowed) -> canvas points, the inverse of ``to_video_pixels``.

    ceil(x canvas_w / W): when the video is at least as large as the canvas, canvas -> video -> canvas
    is exact; when it is smaller, video -> canvas -> video is exact.  Clamped onto the canvas.
    """
    (height, width), xy = video_size_hw, np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    scaled = xy * np.array([canvas_size[0] / width, canvas_size[1] / height])
    cells = np.ceil(scaled - 1e-9).astype(np.int64)  # the epsilon absorbs float error on exact integers
    cells = np.clip(cells, 0, np.array(canvas_size) - 1)
    return [tuple(p) for p in cells.tolist()]


# ----------------------------------------------------------------------------------------------
# Timing: drawn points -> one canvas point per frame
# ----------------------------------------------------------------------------------------------

def ease_in_out(u: np.ndarray) -> np.ndarray:
    """Fraction of the path covered at time fraction u in [0, 1]: (1 - cos(pi u)) / 2."""
    return (1.0 - np.cos(np.pi * u)) / 2.0


def time_track(track: Track, num_frames: int, mode: str = "as_drawn", where: str = "track") -> list[Point]:
    """A drawn track -> ``num_frames`` canvas points, one per frame (see the module docstring)."""
    if mode not in TIMING_MODES:
        raise TrackError(f"unknown timing {mode!r}; choose one of {', '.join(TIMING_MODES)}")
    if num_frames < 2:
        raise TrackError(f"a track needs at least 2 frames, got {num_frames}")
    if not track.points:
        raise TrackError(f"{where} has no points")
    if track.static:
        return [tuple(track.points[0])] * num_frames
    if len(track.points) < 2:
        raise TrackError(f"{where} has only 1 point; a moving track needs at least 2 (or mark it static)")
    if mode == "uniform":
        return resample_uniform(track.points, num_frames)
    if mode == "ease":
        dense = resample_uniform(track.points, EASE_RESOLUTION)  # equally spaced by arc length
        picks = np.rint(ease_in_out(np.linspace(0.0, 1.0, num_frames)) * (EASE_RESOLUTION - 1)).astype(int)
        return [dense[i] for i in picks]
    xy = np.asarray(track.points, dtype=np.float64)  # as drawn: the recorded points are equally spaced in time
    steps = np.linspace(0.0, len(xy) - 1, num_frames)
    timed = np.stack([np.interp(steps, np.arange(len(xy)), xy[:, axis]) for axis in (0, 1)], axis=1)
    return [tuple(p) for p in np.rint(timed).astype(int).tolist()]


def time_tracks(tracks: Sequence[Track], num_frames: int, mode: str = "as_drawn") -> list[list[Point]]:
    """Every track timed; an error names the track (1-based)."""
    if not tracks:
        raise TrackError("no tracks: draw at least one (click to add points, drag to draw freehand)")
    return [time_track(t, num_frames, mode, where=f"track {i}") for i, t in enumerate(tracks, start=1)]


def per_frame_video_pixels(timed: Sequence[Sequence[Point]], canvas_size: tuple[int, int],
                           video_size_hw: tuple[int, int]):
    """Timed canvas points (N tracks x F) -> tracks [N, F, 2] int64 video pixels (``to_video_pixels``)."""
    import torch

    return torch.stack([to_video_pixels(points, canvas_size, video_size_hw) for points in timed])


# ----------------------------------------------------------------------------------------------
# Point files
# ----------------------------------------------------------------------------------------------

def write_point_file(path: str | Path, points: Sequence[Point]) -> Path:
    """One ``x,y`` line per point: the format ``trajectory.read_point_file`` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{int(x)},{int(y)}\n" for x, y in points))
    return path


def write_point_files(folder: str | Path, timed: Sequence[Sequence[Point]], stem: str = "track") -> list[Path]:
    """``folder/<stem>_1.txt`` ... one file per track (pass them all to ``--point_path``)."""
    return [write_point_file(Path(folder) / f"{stem}_{i}.txt", points) for i, points in enumerate(timed, start=1)]


def read_point_files(paths: Sequence[str | Path], canvas_size: tuple[int, int] = (256, 256)) -> list[Track]:
    """Point files -> tracks (a file whose points are all equal is a static track)."""
    tracks = []
    for path in paths:
        points = read_point_file(path, canvas_size)
        tracks.append(Track(points, static=len(set(points)) == 1, name=Path(path).stem))
    return tracks


# ----------------------------------------------------------------------------------------------
# tracks.npy / visibility.npy
# ----------------------------------------------------------------------------------------------

def fill_hidden(positions: np.ndarray, visible: np.ndarray, where: str) -> np.ndarray:
    """One track's positions [F, 2] with the hidden frames filled: linear between visible frames,
    held before the first and after the last.  At least 2 visible frames are needed."""
    frames = np.flatnonzero(visible)
    if len(frames) < 2:
        raise TrackError(f"{where} is visible in {len(frames)} frame(s); a track needs at least 2")
    every = np.arange(len(positions))
    return np.stack([np.interp(every, frames, positions[frames, axis]) for axis in (0, 1)], axis=1)


def tracks_from_arrays(tracks: np.ndarray, visibility: np.ndarray | None, video_size_hw: tuple[int, int],
                       canvas_size: tuple[int, int] = (256, 256), source: str = "tracks.npy") -> list[Track]:
    """tracks [F, N, 2] (x, y) pixels of a ``video_size_hw`` video (+ visibility [F, N]) -> tracks
    with one canvas point per frame."""
    tracks = np.asarray(tracks)
    if tracks.ndim != 3 or tracks.shape[-1] != 2 or not np.issubdtype(tracks.dtype, np.number):
        raise TrackError(f"{source}: expected a numeric array [frames, points, 2], got {tracks.dtype} "
                         f"{list(tracks.shape)}")
    if not np.isfinite(tracks).all():
        raise TrackError(f"{source}: holds NaN or infinite positions (mark such frames invisible instead)")
    if visibility is None:
        visibility = np.ones(tracks.shape[:2], dtype=bool)
    visibility = np.asarray(visibility)
    if visibility.shape != tracks.shape[:2]:
        raise TrackError(f"{source}: visibility must be [frames, points] = {list(tracks.shape[:2])}, "
                         f"got {list(visibility.shape)}")
    result = []
    for n in range(tracks.shape[1]):
        filled = fill_hidden(tracks[:, n].astype(np.float64), visibility[:, n] > 0.5, f"{source}: point {n + 1}")
        points = video_to_canvas(filled, video_size_hw, canvas_size)
        result.append(Track(points, static=len(set(points)) == 1, name=f"point {n + 1}"))
    return result


def arrays_from_tracks(timed: Sequence[Sequence[Point]], canvas_size: tuple[int, int],
                       video_size_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Timed canvas points (N x F) -> tracks [F, N, 2] float32 video pixels, visibility [F, N] bool."""
    pixels = per_frame_video_pixels(timed, canvas_size, video_size_hw).numpy()  # [N, F, 2]
    return pixels.transpose(1, 0, 2).astype(np.float32), np.ones(pixels.shape[1::-1], dtype=bool)


def load_arrays(tracks_path: str | Path, visibility_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read tracks.npy (and visibility.npy) without executing pickled objects."""
    def load(path):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise TrackError(f"cannot read {path} as a .npy array: {err}") from None
    return load(tracks_path), (load(visibility_path) if visibility_path else None)


# ----------------------------------------------------------------------------------------------
# The editor's JSON of all tracks
# ----------------------------------------------------------------------------------------------

def tracks_document(tracks: Sequence[Track], num_frames: int, timing: str, canvas_size: tuple[int, int],
                    video_size_hw: tuple[int, int]) -> dict:
    """Everything about a set of tracks in one JSON-able dict: the drawn points (to edit again), the
    timed canvas points (the point files) and the per-frame video pixels."""
    timed = time_tracks(tracks, num_frames, timing)
    pixels = per_frame_video_pixels(timed, canvas_size, video_size_hw).tolist()
    return {
        "format": JSON_FORMAT, "canvas_size": list(canvas_size), "video_size_hw": list(video_size_hw),
        "num_frames": num_frames, "timing": timing,
        "tracks": [{"name": t.name, "static": t.static, "drawn_points": [list(p) for p in t.points],
                    "frame_points": [list(p) for p in frame_points], "frame_pixels": frame_pixels, **t.extra}
                   for t, frame_points, frame_pixels in zip(tracks, timed, pixels)],
    }


def tracks_from_document(document: dict | str, source: str = "tracks JSON",
                         canvas_size: tuple[int, int] = (256, 256)) -> list[Track]:
    """The drawn tracks of a ``tracks_document`` (its canvas size must match ``canvas_size``)."""
    try:
        data = json.loads(document) if isinstance(document, str) else document
        if data.get("format") != JSON_FORMAT:
            raise TrackError(f"{source}: not a tracks file of this project (format {data.get('format')!r}, "
                             f"expected {JSON_FORMAT!r})")
        if list(data["canvas_size"]) != list(canvas_size):
            raise TrackError(f"{source}: drawn on a {data['canvas_size']} canvas, this model uses {list(canvas_size)}")
        tracks = []
        for i, item in enumerate(data["tracks"], start=1):
            points = [(int(x), int(y)) for x, y in item["drawn_points"]]
            for x, y in points:
                if not (0 <= x < canvas_size[0] and 0 <= y < canvas_size[1]):
                    raise TrackError(f"{source}: track {i} point {(x, y)} is outside the {canvas_size} canvas")
            tracks.append(Track(points, bool(item.get("static", False)), str(item.get("name", ""))))
        return tracks
    except TrackError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise TrackError(f"{source}: malformed tracks JSON ({type(err).__name__}: {err})") from None
