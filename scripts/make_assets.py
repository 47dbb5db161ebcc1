"""Write the project's example inputs: trajectory point files and prompts/images.

    python scripts/make_assets.py [--out DIR]      (default: the repository root)

Creates, deterministically (the committed files are exactly what this script writes):

* ``trajs/*.txt`` - point files on the 256 x 256 canvas, one ``x,y`` pair per line, in order of
  time: circle, spiral, wave, zigzag (5 corners, so the frames in between are interpolated),
  figure_eight, diagonal (2 points), pause (rests, then moves) and ``two_objects_a/_b`` (two objects
  crossing each other, passed together as two files).
* ``assets/t2v_prompts.txt`` - one prompt per line; ``assets/i2v_prompts.txt`` - ``prompt@@image``
  lines with the image in ``assets/images``.
* ``assets/images/ball.png`` - a 720 x 480 first frame: a red ball on grass under a sky, placed at
  the start of ``trajs/pause.txt`` (canvas (60, 180) -> pixel (168, 337)), the trajectory to pair it
  with.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
CANVAS = 256  # the point-file canvas (official 256 x 256)
IMAGE_SIZE = (720, 480)  # width, height of the video
BALL_CANVAS_XY = (60, 180)  # = first point of pause.txt


def _polyline(points) -> list[tuple[int, int]]:
    return [(round(x), round(y)) for x, y in points]


def _parametric(fx, fy, count: int, t_end: float = 1.0) -> list[tuple[int, int]]:
    ts = [t_end * i / (count - 1) for i in range(count)]
    return _polyline((fx(t), fy(t)) for t in ts)


def _line(start, end, count: int) -> list[tuple[int, int]]:
    return _parametric(lambda t: start[0] + t * (end[0] - start[0]),
                       lambda t: start[1] + t * (end[1] - start[1]), count)


def trajectories() -> dict[str, list[tuple[int, int]]]:
    """Name -> canvas points; every point lies inside the canvas."""
    tau = 2 * math.pi
    return {
        "circle": _parametric(lambda t: 128 + 70 * math.cos(tau * t - math.pi / 2),
                              lambda t: 128 + 70 * math.sin(tau * t - math.pi / 2), 36),
        "spiral": _parametric(lambda t: 128 + (10 + 90 * t) * math.cos(2 * tau * t),
                              lambda t: 128 + (10 + 90 * t) * math.sin(2 * tau * t), 40),
        "wave": _parametric(lambda t: 20 + 216 * t, lambda t: 128 + 50 * math.sin(2 * tau * t), 30),
        "zigzag": [(20, 200), (70, 60), (120, 200), (170, 60), (220, 200)],
        "figure_eight": _parametric(lambda t: 128 + 90 * math.sin(tau * t),
                                    lambda t: 128 + 50 * math.sin(2 * tau * t), 40),
        "diagonal": [(30, 220), (226, 36)],
        "pause": [BALL_CANVAS_XY] * 12 + _line(BALL_CANVAS_XY, (200, 80), 21)[1:],
        "two_objects_a": _line((30, 80), (226, 80), 12),
        "two_objects_b": _line((226, 180), (30, 180), 12),
    }


T2V_PROMPTS = [
    "A red kite dances in the wind above a green meadow on a sunny day.",
    "A small white boat sails across a calm blue lake surrounded by pine forests.",
    "A golden retriever runs along a sandy beach as waves roll in at sunset.",
    "A paper airplane glides through a bright classroom full of sunlight.",
]

I2V_PROMPTS = [
    "A red ball rests on the grass, then rolls and bounces away under a clear blue sky.@@ball.png",
    "A shiny red ball rolls across a lawn on a bright summer afternoon.@@ball.png",
]


def ball_image() -> Image.Image:
    """Sky gradient, grass, and a shaded red ball with a shadow (deterministic, compresses well)."""
    width, height = IMAGE_SIZE
    horizon = int(height * 0.55)
    rows = np.arange(height, dtype=np.float64)[:, None]
    sky = np.array([120, 180, 240]) + (rows / horizon) * np.array([90, 50, 10])
    grass = np.array([70, 150, 60]) - ((rows - horizon) / (height - horizon)) * np.array([20, 40, 20])
    colour = np.where(rows < horizon, sky, grass)  # [H, 3]
    pixels = np.repeat(colour[:, None, :], width, axis=1).round().astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    cx, cy = (BALL_CANVAS_XY[0] * width // CANVAS, BALL_CANVAS_XY[1] * height // CANVAS)
    radius = 40
    draw.ellipse([cx - radius, cy + radius - 8, cx + radius + 20, cy + radius + 10], fill=(45, 100, 40))
    for step in range(radius, 0, -4):  # concentric discs towards the highlight: simple shading
        light = 1 - step / radius
        fill = (int(200 + 55 * light), int(30 + 120 * light), int(30 + 120 * light))
        offset = (radius - step) // 2
        draw.ellipse([cx - step - offset, cy - step - offset, cx + step - offset, cy + step - offset],
                     fill=fill)
    return image


def write_assets(root: Path) -> list[Path]:
    """Write every asset under ``root``; returns the written paths."""
    written = []
    (root / "trajs").mkdir(parents=True, exist_ok=True)
    for name, points in trajectories().items():
        path = root / "trajs" / f"{name}.txt"
        path.write_text("".join(f"{x},{y}\n" for x, y in points))
        written.append(path)
    (root / "assets" / "images").mkdir(parents=True, exist_ok=True)
    for name, lines in (("t2v_prompts.txt", T2V_PROMPTS), ("i2v_prompts.txt", I2V_PROMPTS)):
        path = root / "assets" / name
        path.write_text("".join(line + "\n" for line in lines))
        written.append(path)
    path = root / "assets" / "images" / "ball.png"
    ball_image().save(path, optimize=True)
    written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO, help="folder to write trajs/ and assets/ into")
    for path in write_assets(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
