"""Write synthetic moving-object clips with known paths (training set or held-out set).

    .venv/bin/python scripts/make_moving_objects.py --out data/moving_objects --num-clips 3000 --workers 16
    .venv/bin/python scripts/make_moving_objects.py --held-out --out data/moving_objects_held_out

Training set (``tora.data`` layout)::

    <out>/videos/train_<k>.mp4    25 frames at 8 fps, 96x144: 1-3 shapes on a plain or textured background
    <out>/videos/train_<k>.json   ground truth: per-frame object centres (``tora.moving_objects.ground_truth``)
    <out>/labels/train_<k>.txt    caption, e.g. "a red disc and a blue square on a grey background"
    <out>/generator.json          the settings, split and seed that made the folder

Held-out set (``--held-out``): the same clip files for ``--num-clips`` clips of the held-out split
(seeds disjoint from training by construction, see ``tora.moving_objects``) plus one case per
trajectory of ``--trajs`` (the project's ``trajs/`` shapes), and what ``sat/sample_video.py`` needs
to sample them: ``points/<name>_<k>.txt`` (one canvas point per frame and object),
``images/<name>.png``, ``prompts.txt``, ``prompts_i2v.txt`` and ``manifest.json``.
``sample_video.py`` applies the same ``--point_path`` files to every prompt, so a case is sampled by
one call with its own point files (see docs/EVALUATION.md).

Every clip is a pure function of (split, seed, index, settings), so the output does not depend on
``--workers``; x264 runs single-threaded (``tora.video_io``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from functools import partial
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "sat"))  # the `tora` package

from tora.errors import ToraError  # noqa: E402
from tora.moving_objects import (GeneratorConfig, trajectory_clip, trajectory_groups, write_case,  # noqa: E402
                                 write_held_out, write_random_clip)

DEFAULT_CLIPS = {"train": 3000, "held_out": 64}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--num-clips", type=int, default=None,
                        help=f"random clips (default {DEFAULT_CLIPS['train']}, held-out {DEFAULT_CLIPS['held_out']})")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the split")
    parser.add_argument("--frames", type=int, default=GeneratorConfig.num_frames)
    parser.add_argument("--height", type=int, default=GeneratorConfig.height)
    parser.add_argument("--width", type=int, default=GeneratorConfig.width)
    parser.add_argument("--fps", type=int, default=GeneratorConfig.fps)
    parser.add_argument("--max-objects", type=int, default=GeneratorConfig.max_objects)
    parser.add_argument("--workers", type=int, default=1, help="processes (clips are independent)")
    parser.add_argument("--held-out", action="store_true", help="write the held-out set instead")
    parser.add_argument("--trajs", type=Path, default=REPO / "trajs",
                        help="held-out only: point files to turn into cases (<base>_a/_b.txt = one case)")
    parser.add_argument("--no-trajs", action="store_true", help="held-out only: no cases from --trajs")
    return parser.parse_args(argv)


def make_clips(split: str, count: int, seed: int, cfg: GeneratorConfig, out: Path, workers: int) -> list:
    """Render and write ``count`` clips of a split with ``workers`` processes, in index order;
    returns the held-out ``ClipSpec``s (the held-out files need them) or the training clip names."""
    job = partial(write_case, split=split, seed=seed, cfg=cfg, out=out)
    if workers <= 1:
        return [job(index) for index in range(count)]
    with get_context("fork").Pool(workers) as pool:
        return pool.map(job, range(count), chunksize=max(1, count // (8 * workers)))


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = GeneratorConfig(num_frames=args.frames, height=args.height, width=args.width, fps=args.fps,
                          max_objects=args.max_objects)
    split = "held_out" if args.held_out else "train"
    count = DEFAULT_CLIPS[split] if args.num_clips is None else args.num_clips
    try:
        cfg.check()
        started = time.perf_counter()
        clips = make_clips(split, count, args.seed, cfg, args.out, args.workers)
        if args.held_out and not args.no_trajs:
            for index, (name, files) in enumerate(trajectory_groups(args.trajs).items()):
                clip = trajectory_clip(index, name, files, args.seed, cfg)
                write_random_clip(args.out, clip, cfg)
                clips.append(clip)
        if args.held_out:
            write_held_out(args.out, clips, cfg)
    except ToraError as err:
        sys.exit(f"error: {err}")
    (args.out / "generator.json").write_text(json.dumps(
        {"split": split, "seed": args.seed, "num_clips": count, "clips": len(clips),
         "config": asdict(cfg)}, indent=1) + "\n")
    print(f"{args.out}: {len(clips)} {split} clips in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
