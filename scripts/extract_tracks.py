#!/usr/bin/env python
"""Motion transfer: track points through a reference clip and write them as point files.

    python scripts/extract_tracks.py clip.mp4 --points 3 --out trajs/from_clip         # 3 points where it moves
    python scripts/extract_tracks.py clip.mp4 --at 120,80 300,200 --out trajs/from_clip  # these start points

Start points are clip pixels (x,y) in the first frame; pick a textured spot (an edge or a corner of the
object: the tracker, tora.tracking.track_points_lk, cannot follow the flat inside of a uniform shape).
Writes OUT/track_1.txt ... on the trajectory canvas (256 x 256), one point per clip frame, or --frames
points (timing --timing); pass them to sample_video.py --point_path or import them into sat/app.py.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sat"))

from tora.errors import ToraError  # noqa: E402
from tora.motion_transfer import moving_start_points, parse_points, point_tracker, read_clip, transfer_tracks  # noqa: E402
from tora.tracks import TIMING_MODES, time_tracks, write_point_files  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", type=Path)
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--points", type=int, metavar="N", help="track N points where the clip moves")
    start.add_argument("--at", nargs="+", metavar="X,Y", help="start points, clip pixels")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--max-frames", type=int, default=0, help="read only the first N frames (0 = all)")
    p.add_argument("--frames", type=int, help="points per file (default: one per clip frame)")
    p.add_argument("--timing", choices=TIMING_MODES, default="as_drawn")
    p.add_argument("--canvas-size", type=int, nargs=2, default=(256, 256), metavar=("W", "H"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    options = parse_args(argv)
    try:
        frames = read_clip(options.video, options.max_frames)
        tracker = point_tracker()
        starts = (parse_points(options.at, frames.shape[1:3]) if options.at
                  else moving_start_points(frames, options.points, tracker))
        tracks = transfer_tracks(frames, starts, tracker, tuple(options.canvas_size), options.video.name)
        count = options.frames or len(frames)
        files = write_point_files(options.out, time_tracks(tracks, count, options.timing))
    except (ToraError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path, start in zip(files, starts.tolist()):
        print(f"{path}  (start {start[0]:.0f},{start[1]:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
