"""TrajError of a sampling output folder: track every requested trajectory, print the table.

    .venv/bin/python scripts/eval_traj.py samples/motion --baseline samples/no_motion --tracker colour \
        --strips docs/img/strips --plots docs/img
    .venv/bin/python scripts/eval_traj.py --validate data/held_out --tracker lk    # the tracker's own error

RUN is a ``sat/sample_video.py`` output folder (``video/``, ``traj/``, ``prompt/``).  ``--baseline``
is the same prompts and seeds sampled with ``--no-flow-injection``; its videos (same names) are
scored against RUN's requested trajectories and the table gets the ratio.  ``--validate DIR``
scores a clip folder of ``scripts/make_moving_objects.py`` against its ground truth instead.
The protocol: docs/EVALUATION.md and ``tora.evaluation``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sat"))  # the `tora` package

from tora.errors import ToraError  # noqa: E402
from tora.evaluation import (COLOUR_SOURCES, TRACKERS, EvalConfig, evaluate, load_clips, load_run,  # noqa: E402
                             markdown_table, per_video, plot_curves, ratios, video_table, write_strips)


def parse_args(argv=None) -> argparse.Namespace:
    defaults = EvalConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, nargs="?", help="sampling output folder")
    parser.add_argument("--validate", type=Path, help="score a clip folder against its ground truth instead")
    parser.add_argument("--baseline", type=Path, help="the same prompts/seeds sampled without motion")
    parser.add_argument("--tracker", choices=TRACKERS, default=defaults.tracker)
    parser.add_argument("--colour-from", choices=COLOUR_SOURCES, default=defaults.colour.colour_from,
                        help="colour tracker: where each trajectory's colour comes from")
    parser.add_argument("--colour-threshold", type=float, default=defaults.colour.threshold,
                        help="colour tracker: RGB distance of a pixel of the object's colour")
    parser.add_argument("--patch-radius", type=float, default=defaults.patch.radius,
                        help="lk/raft: half size (px) of the grid of tracked points at a 96 px short side "
                             "(scaled with the video's short side)")
    parser.add_argument("--raft-weights", default=defaults.raft.weights, help="raft: torchvision RAFT state dict")
    parser.add_argument("--raft-model", default=defaults.raft.model, help="raft: raft_large or raft_small")
    parser.add_argument("--json", type=Path, help="summary file (default <RUN>/trajerror_<tracker>.json)")
    parser.add_argument("--per-video", action="store_true", help="also print the per-video table")
    parser.add_argument("--plots", type=Path, help="folder for the per-frame error curve PNG")
    parser.add_argument("--strips", type=Path, help="folder for frame strips (requested vs tracked path)")
    parser.add_argument("--strip-videos", type=int, default=4, help="how many videos get a strip")
    args = parser.parse_args(argv)
    if (args.run is None) == (args.validate is None):
        parser.error("give a sampling output folder RUN or --validate CLIP_DIR (one of them)")
    if args.validate is not None and args.baseline is not None:
        parser.error("--baseline needs a sampling output folder, not --validate")
    return args


def config_from(args: argparse.Namespace) -> EvalConfig:
    defaults = EvalConfig()
    return replace(defaults, tracker=args.tracker,
                   colour=replace(defaults.colour, colour_from=args.colour_from, threshold=args.colour_threshold),
                   patch=replace(defaults.patch, radius=args.patch_radius),
                   raft=replace(defaults.raft, weights=args.raft_weights, model=args.raft_model))


def run(args: argparse.Namespace) -> dict:
    cfg = config_from(args)
    source = args.run or args.validate
    videos = load_run(args.run) if args.run else load_clips(args.validate)
    motion = evaluate(videos, cfg)
    report = {"run": str(source), "mode": "run" if args.run else "validate", "config": asdict(cfg),
              "summary": motion.summary, "videos": per_video(motion.scores), "trajectories": motion.scores}
    baseline, baseline_videos = None, []
    if args.baseline:
        baseline_videos = load_run(args.baseline, requested_from=videos)
        baseline = evaluate(baseline_videos, cfg, colours=motion.colours)
        report.update(baseline=str(args.baseline), baseline_summary=baseline.summary,
                      ratio=ratios(motion.summary, baseline.summary), baseline_videos=per_video(baseline.scores),
                      baseline_trajectories=baseline.scores)
    label = "with motion" if args.run else f"{cfg.tracker} tracker vs ground truth"
    print(markdown_table(motion.summary, baseline.summary if baseline else None, label))
    if args.per_video:
        print()
        print(video_table(report["videos"], report.get("baseline_videos")))
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        curves = {"with motion": motion.summary["curve"]}
        if baseline:
            curves["without motion"] = baseline.summary["curve"]
        print(f"wrote {plot_curves(args.plots / 'trajerror_per_frame.png', curves)}")
    if args.strips:
        for path in write_strips(args.strips, motion, videos, baseline, baseline_videos, args.strip_videos):
            print(f"wrote {path}")
    json_path = args.json or source / f"trajerror_{cfg.tracker}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {json_path}")
    return report


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except (ToraError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
