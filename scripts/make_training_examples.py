"""Write the project's own fine-tuning examples: synthetic clips with known object motion.

    .venv/bin/python scripts/make_training_examples.py [--out training_examples]

Official SFT layout (see tora.data)::

    <out>/videos/<name>.mp4    240x360 H.264 clip: coloured discs/squares over a textured gradient
    <out>/videos/<name>.json   ground truth: per-frame object centres (for checking flow tracking)
    <out>/labels/<name>.txt    caption

The lengths and frame rates cover the sampling cases of spec 7.2: five clips are long enough for
the random-window case (a) at 8 fps (source rates 8, 10, 12, 16), one is short (case (c)).

Everything is analytic (no random numbers) and x264 runs single-threaded, so a re-run reproduces
the clips: byte-identical in almost all runs; a few runs on a heavily loaded machine gave pixel
differences of at most 2 levels from the encoder, cause unknown.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sat"))  # the `tora` package

from tora.moving_objects import Sprite, ground_truth, render_frames, write_clip  # noqa: E402

HEIGHT, WIDTH = 240, 360
SHAPES = ("disc", "square")  # the shapes these clips use (named in the ground truth's convention)
# Pixel-centre coordinates [H, W]: pixel (row i, column j) has its centre at x = j, y = i.
PIXEL_Y, PIXEL_X = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)

# A path maps progress u in [0, 1] (first to last frame) to a centre (x, y) in pixels.
Path2D = Callable[[float], tuple[float, float]]


@dataclass(frozen=True)
class MovingObject:
    name: str
    shape: str  # "disc" (size = radius) or "square" (size = half side)
    size: float
    color: tuple[int, int, int]
    path: Path2D


@dataclass(frozen=True)
class ExampleClip:
    name: str
    fps: int
    num_frames: int
    caption: str
    objects: tuple[MovingObject, ...]


def line(start: tuple[float, float], end: tuple[float, float]) -> Path2D:
    return lambda u: (start[0] + u * (end[0] - start[0]), start[1] + u * (end[1] - start[1]))


def circle(centre: tuple[float, float], radius: float, turns: float) -> Path2D:
    return lambda u: (centre[0] + radius * math.cos(2 * math.pi * turns * u),
                      centre[1] + radius * math.sin(2 * math.pi * turns * u))


def zigzag(x_range: tuple[float, float], y_range: tuple[float, float], legs: int) -> Path2D:
    """Left to right while bouncing between y_range[0] and y_range[1] `legs` times."""
    def at(u: float) -> tuple[float, float]:
        leg = min(int(u * legs), legs - 1)
        along = u * legs - leg  # progress within the leg, 0..1
        down = along if leg % 2 == 0 else 1 - along
        return (x_range[0] + u * (x_range[1] - x_range[0]),
                y_range[0] + down * (y_range[1] - y_range[0]))
    return at


def wave(x_range: tuple[float, float], y_centre: float, amplitude: float, periods: float) -> Path2D:
    return lambda u: (x_range[0] + u * (x_range[1] - x_range[0]),
                      y_centre + amplitude * math.sin(2 * math.pi * periods * u))


CLIPS = (
    ExampleClip(
        "disc_line", fps=8, num_frames=64,
        caption="A red ball glides steadily from the left edge to the right edge across a softly "
                "lit, gently patterned background.",
        objects=(MovingObject("red disc", "disc", 22, (220, 40, 40),
                              line((40, 120), (320, 120))),)),
    ExampleClip(
        "square_circle", fps=12, num_frames=84,
        caption="A blue square travels around a wide circle in the middle of the frame, completing "
                "one full loop.",
        objects=(MovingObject("blue square", "square", 20, (40, 80, 220),
                              circle((180, 120), 80, turns=1.0)),)),
    ExampleClip(
        "disc_zigzag", fps=16, num_frames=112,
        caption="A green ball bounces in a zigzag from the top left towards the bottom right of "
                "the frame.",
        objects=(MovingObject("green disc", "disc", 18, (40, 190, 70),
                              zigzag((40, 320), (40, 200), legs=4)),)),
    ExampleClip(
        "two_objects", fps=10, num_frames=72,
        caption="A yellow ball moves to the right along the top while a magenta square moves to "
                "the left along the bottom; they pass each other in the middle.",
        objects=(MovingObject("yellow disc", "disc", 20, (235, 210, 40), line((40, 70), (320, 70))),
                 MovingObject("magenta square", "square", 18, (200, 50, 190),
                              line((320, 170), (40, 170))))),
    ExampleClip(
        "disc_wave", fps=8, num_frames=60,
        caption="An orange ball floats from left to right, rising and falling in a smooth wave.",
        objects=(MovingObject("orange disc", "disc", 20, (240, 140, 30),
                              wave((40, 320), 120, 70, periods=1.5)),)),
    ExampleClip(
        "disc_short", fps=8, num_frames=24,
        caption="A cyan ball drifts diagonally downwards from the top left corner in a short clip.",
        objects=(MovingObject("cyan disc", "disc", 20, (40, 200, 210),
                              line((60, 50), (200, 170))),)),
)


def background() -> np.ndarray:
    """Static float [H, W, 3] in [0, 255]: a vertical colour gradient with a soft texture (texture
    gives optical flow something to lock on; it stays still, so its true flow is zero)."""
    top, bottom = np.array([150.0, 170.0, 200.0]), np.array([90.0, 110.0, 90.0])
    gradient = top + (PIXEL_Y / (HEIGHT - 1))[..., None] * (bottom - top)
    texture = (14.0 * np.sin(PIXEL_X / 6.0) * np.sin(PIXEL_Y / 8.0)
               + 8.0 * np.sin((PIXEL_X + 2 * PIXEL_Y) / 15.0))
    return gradient + texture[..., None]


def sprite(obj: MovingObject) -> Sprite:
    return Sprite(obj.name, obj.shape, obj.size, obj.color)


def centres_of(clip: ExampleClip) -> np.ndarray:
    """Each object's centre per frame [N, F, 2] (x, y), the frames spread evenly over the path."""
    progress = [t / (clip.num_frames - 1) for t in range(clip.num_frames)]
    return np.array([[obj.path(u) for u in progress] for obj in clip.objects], np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "training_examples")
    out = parser.parse_args().out
    (out / "labels").mkdir(parents=True, exist_ok=True)
    for clip in CLIPS:
        sprites, centres = [sprite(obj) for obj in clip.objects], centres_of(clip)
        frames = render_frames(background(), sprites, centres)
        truth = ground_truth(clip.fps, HEIGHT, WIDTH, sprites, centres, shapes=SHAPES)
        video = write_clip(out, clip.name, frames, clip.fps, clip.caption, truth)
        print(f"{video}: {clip.num_frames} frames at {clip.fps} fps")


if __name__ == "__main__":
    main()
