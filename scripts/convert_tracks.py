#!/usr/bin/env python
"""Convert tracks between the project's point files and tracks.npy / visibility.npy.

    # point files -> tracks.npy [frames, points, 2] (x, y pixels of a WIDTHxHEIGHT video) + visibility.npy
    python scripts/convert_tracks.py to-npy trajs/circle.txt trajs/wave.txt --frames 49 --video-size 720x480 --out DIR
    # tracks.npy (+ visibility.npy) -> one point file per track (one point per frame; --frames resamples)
    python scripts/convert_tracks.py from-npy tracks.npy [--visibility visibility.npy] --video-size 720x480 --out DIR

Point files are on the trajectory canvas (256 x 256 unless --canvas-size says otherwise); --timing
(as_drawn, uniform, ease) sets how a path is spread over the frames (tora.tracks.time_track).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sat"))

import numpy as np  # noqa: E402

from tora.errors import ToraError  # noqa: E402
from tora.tracks import (TIMING_MODES, arrays_from_tracks, load_arrays, read_point_files,  # noqa: E402
                         time_tracks, tracks_from_arrays, write_point_files)


def size(text: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" -> (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 720x480, got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return width, height


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    to_npy = sub.add_parser("to-npy", help="point files -> tracks.npy + visibility.npy")
    to_npy.add_argument("point_files", nargs="+", type=Path)
    to_npy.add_argument("--frames", type=int, required=True, help="frames of the tracks")
    from_npy = sub.add_parser("from-npy", help="tracks.npy (+ visibility.npy) -> point files")
    from_npy.add_argument("tracks", type=Path)
    from_npy.add_argument("--visibility", type=Path)
    from_npy.add_argument("--frames", type=int, help="resample to this many points (default: one per frame)")
    for command in (to_npy, from_npy):
        command.add_argument("--video-size", type=size, required=True, metavar="WxH",
                             help="the video the pixel tracks refer to")
        command.add_argument("--canvas-size", type=size, default=(256, 256), metavar="WxH")
        command.add_argument("--timing", choices=TIMING_MODES, default="as_drawn")
        command.add_argument("--out", type=Path, required=True, help="output folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    options = parse_args(argv)
    video_hw = options.video_size[::-1]
    try:
        if options.command == "to-npy":
            timed = time_tracks(read_point_files(options.point_files, options.canvas_size), options.frames, options.timing)
            positions, visibility = arrays_from_tracks(timed, options.canvas_size, video_hw)
            options.out.mkdir(parents=True, exist_ok=True)
            np.save(options.out / "tracks.npy", positions)
            np.save(options.out / "visibility.npy", visibility)
            print(f"wrote {options.out / 'tracks.npy'} {list(positions.shape)} and visibility.npy")
        else:
            arrays = load_arrays(options.tracks, options.visibility)
            tracks = tracks_from_arrays(*arrays, video_hw, options.canvas_size, options.tracks.name)
            frames = options.frames or len(tracks[0].points)
            files = write_point_files(options.out, time_tracks(tracks, frames, options.timing))
            print(f"wrote {len(files)} point file(s) of {frames} points to {options.out}")
    except (ToraError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
