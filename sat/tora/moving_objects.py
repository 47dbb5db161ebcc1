"""Synthetic clips of coloured shapes moving along known paths: rendering, paths, captions, files.

Used by ``scripts/make_moving_objects.py`` (training and held-out sets), by
``scripts/make_training_examples.py`` (the same renderer and ground-truth format) and by the
TrajError evaluation (``tora.evaluation``: colour names, ground truth of the tracker validation).

One clip folder, the layout ``tora.data`` reads::

    <out>/videos/<name>.mp4     the clip (``tora.video_io.write_mp4``)
    <out>/videos/<name>.json    ground truth: per-frame object centres (``ground_truth``)
    <out>/labels/<name>.txt     the caption, e.g. "a red disc and a blue square on a grey background"

Coordinates: (x, y) with x the column and y the row; pixel (row i, column j) has its centre at
x = j, y = i.  An object's centre is its centroid (every shape here is centrally symmetric or
regular), which is what the colour tracker of the evaluation measures.

Randomness: clip ``index`` of split ``split`` under base seed ``seed`` draws everything from
``numpy.random.default_rng([SPLITS[split], seed, index])`` (``clip_rng``).  The split id is the first
word of the seed sequence, so a training clip and a held-out clip never share a seed, whatever
``--seed`` and ``--num-clips`` are: that is how the held-out paths stay disjoint from training.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .errors import ToraError
from .trajectory import read_point_file
from .video_io import write_mp4

# Object colours: saturated, far from each other (min RGB distance 81, orange-yellow) and from every
# background below (min 123, green-grey), so a colour threshold separates them (tested).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (40, 90, 235), "yellow": (240, 220, 40),
    "magenta": (220, 50, 210), "cyan": (40, 210, 220), "orange": (250, 140, 30), "white": (245, 245, 245),
}
# Background colours: greys and dark tones; no name contains a palette word (captions are parsed).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (105, 105, 105), "dark grey": (55, 55, 55), "charcoal": (35, 38, 42), "black": (12, 12, 12),
    "navy": (22, 28, 62), "brown": (78, 58, 42), "olive": (62, 64, 34), "plum": (62, 36, 62),
}
# Outdoor scenes (the demo image is a ball on grass under a sky): a sky gradient above a horizon at a
# random height, a grass gradient below.  Colours (top, bottom) per band; objects on a scene avoid the
# palette colours near them (green, blue, cyan, white), so the colour threshold still separates them.
SCENES: dict[str, dict] = {
    "sky and grass": {"sky": ((110, 170, 235), (205, 225, 248)), "grass": ((72, 150, 62), (48, 112, 42)),
                      "exclude": ("green", "blue", "cyan", "white")},
}
SHAPES = ("disc", "square", "triangle", "star")
# What an object's "size" means per shape (the ground truth's convention string).
SIZE_MEANING = {"disc": "radius (disc)", "square": "half side (square)",
                "triangle": "circumradius (triangle)", "star": "outer radius (star)"}
STAR_INNER_RATIO = 0.45  # inner / outer vertex radius of the five-pointed star
SPLITS = {"train": 0, "held_out": 1, "trajs": 2}
PATH_KINDS = ("line", "spline", "arc", "zigzag")
TIMING_KINDS = ("constant", "ease", "pause", "speed_change", "accelerate")

_CAPTION_OBJECT = re.compile(r"\b(" + "|".join(PALETTE) + r")\s+(" + "|".join(SHAPES) + r")\b")


class MovingObjectsError(ToraError, ValueError):
    """Bad generator settings or a malformed ground-truth file; the message names it."""


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GeneratorConfig:
    """Every knob of the generator (the CLI sets the first five)."""
    num_frames: int = 25
    height: int = 96
    width: int = 144
    fps: int = 8
    max_objects: int = 3  # 1 .. max_objects objects per clip, uniformly
    size_range: tuple[float, float] = (8.0, 16.0)  # object size in px at height 96 (scaled with height)
    travel_range: tuple[float, float] = (0.25, 1.2)  # path length / frame width
    max_step: float = 8.0  # px per frame at height 96 (scaled with height): paths get shorter instead
    scene_share: float = 0.3  # clips on an outdoor scene (SCENES); the others on a plain colour
    textured_background_share: float = 0.5  # of the plain-colour backgrounds; the rest are flat
    texture_amplitude: float = 10.0  # background texture, +- grey levels
    shading: float = 0.15  # object brightness swing (lit from the top left): colour x (1 +- shading)
    min_gap: float = 3.0  # px kept between two objects' outlines in every frame
    max_attempts: int = 50  # redraws of a clip's paths before objects are made smaller

    def check(self) -> None:
        if self.num_frames < 2 or self.height < 16 or self.width < 16 or self.height % 2 or self.width % 2:
            raise MovingObjectsError(f"need num_frames >= 2 and even height, width >= 16, got "
                                     f"{self.num_frames} frames of {self.height}x{self.width}")
        colours = len(PALETTE) - (max(len(sc["exclude"]) for sc in SCENES.values()) if self.scene_share > 0 else 0)
        if not 1 <= self.max_objects <= colours:
            raise MovingObjectsError(f"max_objects must be in [1, {colours}] (the palette colours usable on "
                                     f"every background), got {self.max_objects}")
        if self.fps <= 0:
            raise MovingObjectsError(f"fps must be positive, got {self.fps}")


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sprite:
    """One object's look; ``size`` in px (see SIZE_MEANING), ``rotation`` in radians (triangle, star)."""
    name: str  # "red disc"
    shape: str
    size: float
    color: tuple[int, int, int]
    rotation: float = 0.0
    shading: float = 0.25

    @property
    def extent(self) -> float:
        """Largest distance from the centre to the outline (the square's corner: size * sqrt 2)."""
        return self.size * math.sqrt(2) if self.shape == "square" else self.size


def pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each float64 [H, W]."""
    grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float64)
    return grid_y, grid_x


def polygon_vertices(sprite: Sprite, centre: Sequence[float]) -> np.ndarray:
    """Triangle (3) or star (10) outline [V, 2] (x, y), the first tip pointing up at rotation 0."""
    if sprite.shape == "triangle":
        radii, count = np.full(3, sprite.size), 3
    else:
        radii, count = np.tile([sprite.size, sprite.size * STAR_INNER_RATIO], 5), 10
    angles = sprite.rotation - math.pi / 2 + 2 * math.pi * np.arange(count) / count
    return np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], axis=1)


def polygon_signed_distance(vertices: np.ndarray, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Signed distance [H, W] from each pixel centre to a simple polygon [V, 2] (negative inside)."""
    grid_y, grid_x = grid
    distance = np.full(grid_x.shape, np.inf)
    inside = np.zeros(grid_x.shape, bool)
    for (ax, ay), (bx, by) in zip(vertices, np.roll(vertices, -1, axis=0)):
        ex, ey = bx - ax, by - ay
        along = np.clip(((grid_x - ax) * ex + (grid_y - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        distance = np.minimum(distance, np.hypot(grid_x - ax - along * ex, grid_y - ay - along * ey))
        crosses = (ay > grid_y) != (by > grid_y)  # even-odd rule, a ray towards +x
        with np.errstate(divide="ignore", invalid="ignore"):
            crossing_x = ax + (grid_y - ay) * ex / ey
        inside ^= crosses & (grid_x < crossing_x)
    return np.where(inside, -distance, distance)


def coverage(sprite: Sprite, centre: Sequence[float], grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Anti-aliased [H, W] coverage in [0, 1] of the object at a sub-pixel centre (x, y)."""
    grid_y, grid_x = grid
    dx, dy = grid_x - centre[0], grid_y - centre[1]
    if sprite.shape == "disc":
        return np.clip(sprite.size + 0.5 - np.hypot(dx, dy), 0.0, 1.0)
    if sprite.shape == "square":
        inside_x = np.clip(sprite.size + 0.5 - np.abs(dx), 0.0, 1.0)
        inside_y = np.clip(sprite.size + 0.5 - np.abs(dy), 0.0, 1.0)
        return inside_x * inside_y
    if sprite.shape in ("triangle", "star"):
        return np.clip(0.5 - polygon_signed_distance(polygon_vertices(sprite, centre), grid), 0.0, 1.0)
    raise MovingObjectsError(f"unknown shape {sprite.shape!r}; choose one of {SHAPES}")


def shading(sprite: Sprite, centre: Sequence[float], grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """[H, W] brightness factor, 1 at the centre, lit from the top left: the object's own texture
    (it moves with the object, so trackers have something to follow inside it)."""
    grid_y, grid_x = grid
    light = ((centre[0] - grid_x) + (centre[1] - grid_y)) / (2.0 * sprite.size)
    return 1.0 + sprite.shading * np.clip(light, -1.0, 1.0)


def render_frames(background: np.ndarray, sprites: Sequence[Sprite], centres: np.ndarray) -> np.ndarray:
    """Static float background [H, W, 3] (0..255), sprites, centres [N, F, 2] -> uint8 [F, H, W, 3].
    Later sprites are drawn on top."""
    height, width, _ = background.shape
    grid_y, grid_x = pixel_grid(height, width)
    frames = np.empty((centres.shape[1], height, width, 3), np.uint8)
    for t in range(centres.shape[1]):
        image = background.copy()
        for sprite, centre in zip(sprites, centres[:, t]):
            # Only the object's bounding box: its coverage is exactly 0 further out, so this is the
            # whole-frame blend, computed where it changes something.
            rows, cols = _bounding_box(sprite, centre, height, width)
            grid = (grid_y[rows, cols], grid_x[rows, cols])
            alpha = coverage(sprite, centre, grid)[..., None]
            colour = np.array(sprite.color, np.float64) * shading(sprite, centre, grid)[..., None]
            image[rows, cols] = (1 - alpha) * image[rows, cols] + alpha * colour
        frames[t] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return frames


def _bounding_box(sprite: Sprite, centre: Sequence[float], height: int, width: int) -> tuple[slice, slice]:
    """Rows and columns of the pixels the object may cover (its extent + 2 px around the centre)."""
    reach = sprite.extent + 2
    x0, x1 = max(int(math.floor(centre[0] - reach)), 0), min(int(math.ceil(centre[0] + reach)) + 1, width)
    y0, y1 = max(int(math.floor(centre[1] - reach)), 0), min(int(math.ceil(centre[1] + reach)) + 1, height)
    return slice(y0, max(y1, y0)), slice(x0, max(x1, x0))


# ----------------------------------------------------------------------------------------------
# Ground truth files
# ----------------------------------------------------------------------------------------------

def convention(shapes: Sequence[str]) -> str:
    """The ground truth's "convention" text for a data set that may hold ``shapes``."""
    sizes = [SIZE_MEANING[shape] for shape in shapes]
    size_text = sizes[0] if len(sizes) == 1 else ", ".join(sizes[:-1]) + " or " + sizes[-1]
    return (f"centres: [x, y] per frame, x = column, y = row, pixel centres at integers; "
            f"size: {size_text}, in pixels")


def ground_truth(fps: float, height: int, width: int, sprites: Sequence[Sprite], centres: np.ndarray,
                 shapes: Sequence[str] = SHAPES, extra: dict | None = None,
                 object_extra: Sequence[dict] | None = None) -> dict:
    """The ground-truth json object of a clip: centres [N, F, 2] rounded to 1/1000 px.

    Keys: fps, num_frames, height, width, convention, objects [{name, shape, size, color, centres,
    ...object_extra}], then ``extra``'s keys."""
    objects = []
    for index, sprite in enumerate(sprites):
        track = [[round(float(x), 3), round(float(y), 3)] for x, y in centres[index]]
        objects.append({"name": sprite.name, "shape": sprite.shape, "size": sprite.size,
                        "color": list(sprite.color), "centres": track,
                        **(object_extra[index] if object_extra else {})})
    return {"fps": fps, "num_frames": int(centres.shape[1]), "height": height, "width": width,
            "convention": convention(shapes), "objects": objects, **(extra or {})}


def write_clip(out: Path, name: str, frames: np.ndarray, fps: float, caption: str, truth: dict) -> Path:
    """Write ``<out>/videos/<name>.mp4``, its ``.json`` ground truth and ``<out>/labels/<name>.txt``."""
    video = Path(out) / "videos" / f"{name}.mp4"
    write_mp4(video, frames, fps)
    video.with_suffix(".json").write_text(json.dumps(truth) + "\n")
    label = Path(out) / "labels" / f"{name}.txt"
    label.parent.mkdir(parents=True, exist_ok=True)
    label.write_text(caption + "\n")
    return video


def read_ground_truth(video: str | Path) -> dict:
    """The ground truth next to a clip (``<name>.json`` beside ``<name>.mp4``), checked: returns the
    json object with every object's ``centres`` as float64 [F, 2]."""
    path = Path(video).with_suffix(".json")
    try:
        truth = json.loads(path.read_text())
        for obj in truth["objects"]:
            obj["centres"] = np.asarray(obj["centres"], np.float64).reshape(truth["num_frames"], 2)
    except FileNotFoundError:
        raise MovingObjectsError(f"no ground truth {path} beside {video}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise MovingObjectsError(f"{path}: not a ground-truth file ({type(err).__name__}: {err}); "
                                 f"expected num_frames and objects[].centres [[x, y]] per frame") from None
    return truth


# ----------------------------------------------------------------------------------------------
# Paths and timing
# ----------------------------------------------------------------------------------------------

DENSE_SAMPLES = 256  # samples of a path's polyline before it is re-timed


def catmull_rom(control: np.ndarray, samples: int = DENSE_SAMPLES) -> np.ndarray:
    """Centripetal-free (uniform) Catmull-Rom spline through control points [K, 2] -> [samples, 2]."""
    padded = np.concatenate([2 * control[:1] - control[1:2], control, 2 * control[-1:] - control[-2:-1]])
    u = np.linspace(0, len(control) - 1, samples)
    segment = np.minimum(u.astype(int), len(control) - 2)
    s = (u - segment)[:, None]
    p0, p1, p2, p3 = (padded[segment + k] for k in range(4))
    return 0.5 * (2 * p1 + (p2 - p0) * s + (2 * p0 - 5 * p1 + 4 * p2 - p3) * s ** 2
                  + (3 * p1 - p0 - 3 * p2 + p3) * s ** 3)


def polyline(points: np.ndarray, samples: int = DENSE_SAMPLES) -> np.ndarray:
    """Corners [K, 2] -> [samples, 2] evenly spaced in the corner index (sharp turns kept)."""
    u = np.linspace(0, len(points) - 1, samples)
    return np.stack([np.interp(u, np.arange(len(points)), points[:, axis]) for axis in (0, 1)], axis=1)


def random_shape(kind: str, rng: np.random.Generator, box: np.ndarray) -> np.ndarray:
    """A dense path [DENSE_SAMPLES, 2] of the given kind, roughly inside box [[x0, y0], [x1, y1]]."""
    low, high = box
    span = high - low
    if kind == "line":
        return polyline(rng.uniform(low, high, (2, 2)))
    if kind == "spline":
        return catmull_rom(rng.uniform(low, high, (int(rng.integers(3, 6)), 2)))
    if kind == "arc":
        radius = rng.uniform(0.25, 0.6) * span.min() * np.array([span[0] / span.min(), 1.0])
        start, sweep = rng.uniform(0, 2 * math.pi), rng.choice([-1, 1]) * rng.uniform(0.5, 1.8) * math.pi
        angles = start + sweep * np.linspace(0, 1, DENSE_SAMPLES)
        centre = (low + high) / 2 + rng.uniform(-0.2, 0.2, 2) * span
        return centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if kind == "zigzag":
        legs = int(rng.integers(2, 5))
        along = np.linspace(0, 1, legs + 1)
        across = np.where(np.arange(legs + 1) % 2 == 0, rng.uniform(0, 0.35), rng.uniform(0.65, 1))
        corners = np.stack([along, across], axis=1) if rng.random() < 0.5 else np.stack([across, along], axis=1)
        if rng.random() < 0.5:
            corners = corners[::-1]
        return polyline(low + corners * span)
    raise MovingObjectsError(f"unknown path kind {kind!r}; choose one of {PATH_KINDS}")


def fit_inside(points: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Shrink (about its bounding-box centre, keeping the aspect) and shift points [P, 2] until
    every point lies inside box [[x0, y0], [x1, y1]]; a path already inside is unchanged."""
    low, high = box
    lo, hi = points.min(axis=0), points.max(axis=0)
    scale = min(1.0, *((high - low) / np.maximum(hi - lo, 1e-9)))
    middle = (lo + hi) / 2
    fitted = middle + (points - middle) * scale
    lo, hi = fitted.min(axis=0), fitted.max(axis=0)
    shift = np.maximum(low - lo, 0) - np.maximum(hi - high, 0)
    return np.clip(fitted + shift, low, high)  # the clip only removes float rounding


def timing(kind: str, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Progress along the path per frame [F], non-decreasing from 0 to 1."""
    u = np.linspace(0.0, 1.0, num_frames)
    if kind == "constant":
        return u
    if kind == "ease":  # slow start and end
        return u * u * (3 - 2 * u)
    if kind == "accelerate":
        power = rng.uniform(1.6, 2.6)
        return u ** power if rng.random() < 0.5 else 1 - (1 - u) ** power
    if kind == "pause":  # constant speed with a stop of 3 .. F/3 frames somewhere inside
        length = int(rng.integers(3, max(4, num_frames // 3) + 1))
        start = int(rng.integers(1, num_frames - length))
        speed = np.ones(num_frames - 1)
        speed[start:start + length - 1] = 0.0
        return np.concatenate([[0.0], np.cumsum(speed) / speed.sum()])
    if kind == "speed_change":  # one speed, then another (ratio 3 .. 6)
        switch = int(rng.integers(num_frames // 4, 3 * num_frames // 4))
        ratio = rng.uniform(3, 6)
        speed = np.where(np.arange(num_frames - 1) < switch, 1.0, ratio)
        speed = speed if rng.random() < 0.5 else speed[::-1]
        return np.concatenate([[0.0], np.cumsum(speed) / speed.sum()])
    raise MovingObjectsError(f"unknown timing {kind!r}; choose one of {TIMING_KINDS}")


def retime(dense: np.ndarray, progress: np.ndarray) -> np.ndarray:
    """Positions [F, 2] at the given arc-length fractions [F] along a dense path [P, 2]."""
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))])
    target = progress * arc[-1]
    return np.stack([np.interp(target, arc, dense[:, axis]) for axis in (0, 1)], axis=1)


def path_length(track: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(track, axis=0), axis=1).sum())


def centre_box(extent: float, height: int, width: int) -> np.ndarray:
    """Where a centre may go so that the whole object (up to ``extent`` px out) stays in the frame."""
    margin = extent + 1.0
    return np.array([[margin, margin], [width - 1 - margin, height - 1 - margin]])


# ----------------------------------------------------------------------------------------------
# Clips
# ----------------------------------------------------------------------------------------------

@dataclass
class ClipSpec:
    """Everything of one clip; ``centres`` [N, F, 2] float (x, y) px."""
    name: str
    seed: list[int]
    sprites: list[Sprite]
    centres: np.ndarray
    background_name: str
    background: np.ndarray  # float [H, W, 3]
    textured: bool
    paths: list[str] = field(default_factory=list)
    timings: list[str] = field(default_factory=list)

    @property
    def caption(self) -> str:
        return caption(self.sprites, self.background_name, self.textured)


def clip_rng(split: str, seed: int, index: int) -> np.random.Generator:
    """The one random stream of a clip (see the module docstring: why the splits never collide)."""
    if split not in SPLITS:
        raise MovingObjectsError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    if seed < 0 or index < 0:
        raise MovingObjectsError(f"seed and index must be >= 0, got {seed}, {index}")
    return np.random.default_rng([SPLITS[split], seed, index])


def caption(sprites: Sequence[Sprite], background_name: str, textured: bool = False) -> str:
    """ "a red disc, a blue square and a green star on a grey background" (objects in order)."""
    names = [f"{article(sprite.name)} {sprite.name}" for sprite in sprites]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} on {article(background_name)} {background_name}{' textured' if textured else ''} background"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_colours(text: str) -> list[str]:
    """Palette colour names of the objects a caption names, in order ("a red disc and a blue square
    ..." -> ["red", "blue"]); only "<colour> <shape>" pairs count."""
    return [match.group(1) for match in _CAPTION_OBJECT.finditer(text.lower())]


def background_colour(name: str) -> tuple[int, int, int]:
    """The representative colour of a background: its plain colour, or a scene's grass colour."""
    return BACKGROUNDS[name] if name in BACKGROUNDS else SCENES[name]["grass"][0]


def scene_image(name: str, rng: np.random.Generator, cfg: GeneratorConfig) -> np.ndarray:
    """float [H, W, 3]: the sky gradient above a horizon at 35-60 % of the height, grass below."""
    scene = SCENES[name]
    horizon = int(round(cfg.height * rng.uniform(0.35, 0.6)))
    rows = []
    for band, length in (("sky", horizon), ("grass", cfg.height - horizon)):
        top, bottom = (np.array(c, np.float64) for c in scene[band])
        ramp = np.linspace(0.0, 1.0, max(length, 1))[:length, None]
        rows.append(top + (bottom - top) * ramp)  # [length, 3]
    return np.broadcast_to(np.concatenate(rows)[:, None, :], (cfg.height, cfg.width, 3)).copy()


def make_background(rng: np.random.Generator, cfg: GeneratorConfig) -> tuple[str, np.ndarray, bool]:
    """(name, float [H, W, 3], textured): a plain colour, or the colour plus a soft static texture, or
    (``cfg.scene_share`` of the clips) an outdoor scene of ``SCENES``."""
    if rng.random() < cfg.scene_share:
        name = list(SCENES)[int(rng.integers(len(SCENES)))]
        return name, scene_image(name, rng, cfg), False
    name = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    image = np.broadcast_to(np.array(BACKGROUNDS[name], np.float64), (cfg.height, cfg.width, 3)).copy()
    textured = bool(rng.random() < cfg.textured_background_share)
    if textured:
        grid_y, grid_x = pixel_grid(cfg.height, cfg.width)
        texture = np.zeros_like(grid_x)
        for _ in range(2):
            period, angle, phase = rng.uniform(5, 20), rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
            texture += np.sin((grid_x * math.cos(angle) + grid_y * math.sin(angle)) * 2 * math.pi / period + phase)
        image += (cfg.texture_amplitude / 2 * texture)[..., None]
    return name, image, textured


def random_sprites(rng: np.random.Generator, cfg: GeneratorConfig, shrink: float, count: int,
                   background: str | None = None) -> list[Sprite]:
    """``count`` objects of distinct colours (none a scene background excludes), random shapes, sizes
    and rotations; sizes scaled by height / 96 and ``shrink``."""
    excluded = SCENES[background]["exclude"] if background in SCENES else ()
    colours = rng.choice([c for c in PALETTE if c not in excluded], size=count, replace=False)
    scale = cfg.height / 96.0 * shrink
    sprites = []
    for colour in colours:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = round(float(rng.uniform(*cfg.size_range)) * scale, 2)
        if shape == "square":  # same area range as a disc
            size = round(size * math.sqrt(math.pi) / 2, 2)
        sprites.append(Sprite(f"{colour} {shape}", shape, size, PALETTE[str(colour)],
                              rotation=round(float(rng.uniform(0, 2 * math.pi)), 3), shading=cfg.shading))
    return sprites


def random_track(rng: np.random.Generator, sprite: Sprite, cfg: GeneratorConfig) -> tuple[np.ndarray, str, str]:
    """One object's centres [F, 2] inside the frame, with its path and timing kinds."""
    box = centre_box(sprite.extent, cfg.height, cfg.width)
    kind = PATH_KINDS[int(rng.integers(len(PATH_KINDS)))]
    pace = TIMING_KINDS[int(rng.integers(len(TIMING_KINDS)))]
    dense = fit_inside(random_shape(kind, rng, box), box)
    progress = timing(pace, cfg.num_frames, rng)
    max_travel = cfg.max_step * cfg.height / 96.0 / np.diff(progress).max()  # fastest frame at max_step
    wanted = min(rng.uniform(*cfg.travel_range) * cfg.width, max_travel)
    if path_length(dense) > wanted:  # cut the path to the wanted length (a random stretch of it)
        arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))])
        start = rng.uniform(0, arc[-1] - wanted)
        dense = retime(dense, np.linspace(start, start + wanted, DENSE_SAMPLES) / arc[-1])
    return retime(dense, progress), kind, pace


def apart(sprites: Sequence[Sprite], centres: np.ndarray, gap: float) -> bool:
    """True when every two objects' outlines stay ``gap`` px apart in every frame (no occlusion)."""
    for i in range(len(sprites)):
        for j in range(i + 1, len(sprites)):
            distance = np.linalg.norm(centres[i] - centres[j], axis=1).min()
            if distance < sprites[i].extent + sprites[j].extent + gap:
                return False
    return True


def random_clip(split: str, seed: int, index: int, cfg: GeneratorConfig) -> ClipSpec:
    """Clip ``index`` of a split: 1..max_objects objects (uniformly) on non-overlapping random
    paths.  Looks and paths are redrawn until the objects stay apart; after every ``max_attempts`` failures the objects
    are made 15 % smaller.  A pure function of (split, seed, index, cfg)."""
    rng = clip_rng(split, seed, index)
    name, background, textured = make_background(rng, cfg)
    count = int(rng.integers(1, cfg.max_objects + 1))  # drawn once: redraws must not favour 1 object
    shrink = 1.0
    for attempt in range(1, 10 * cfg.max_attempts + 1):
        sprites = random_sprites(rng, cfg, shrink, count, name)
        drawn = [random_track(rng, sprite, cfg) for sprite in sprites]
        centres = np.stack([track for track, _, _ in drawn])
        if apart(sprites, centres, cfg.min_gap):
            return ClipSpec(f"{split}_{index:05d}", [SPLITS[split], seed, index], sprites, centres, name,
                            background, textured, [kind for _, kind, _ in drawn], [pace for _, _, pace in drawn])
        if attempt % cfg.max_attempts == 0:
            shrink *= 0.85
    raise MovingObjectsError(f"clip {index} of {split}: no non-overlapping paths found; lower max_objects")


def clip_ground_truth(clip: ClipSpec, cfg: GeneratorConfig) -> dict:
    extra = {"caption": clip.caption, "seed": clip.seed,
             "background": {"name": clip.background_name, "color": list(background_colour(clip.background_name)),
                            "textured": clip.textured}}
    object_extra = [{"rotation": sprite.rotation, "path": kind, "timing": pace}
                    for sprite, kind, pace in zip(clip.sprites, clip.paths, clip.timings)]
    return ground_truth(cfg.fps, cfg.height, cfg.width, clip.sprites, clip.centres, SHAPES, extra, object_extra)


def render_clip(clip: ClipSpec) -> np.ndarray:
    """uint8 frames [F, H, W, 3] of a clip."""
    return render_frames(clip.background, clip.sprites, clip.centres)


def write_random_clip(out: Path, clip: ClipSpec, cfg: GeneratorConfig) -> Path:
    return write_clip(out, clip.name, render_clip(clip), cfg.fps, clip.caption, clip_ground_truth(clip, cfg))


def write_case(index: int, split: str, seed: int, cfg: GeneratorConfig, out: Path) -> ClipSpec | str:
    """Make and write clip ``index`` of a split (one worker job).  Returns the held-out ``ClipSpec``
    (its held-out files are written later) or, for training, only the name: the clip's arrays
    stay in the worker."""
    clip = held_out_clip(index, seed, cfg) if split == "held_out" else random_clip(split, seed, index, cfg)
    write_random_clip(out, clip, cfg)
    return clip if split == "held_out" else clip.name


# ----------------------------------------------------------------------------------------------
# Held-out cases: point files, prompts and first frames for sat/sample_video.py
# ----------------------------------------------------------------------------------------------

CANVAS_SIZE = (256, 256)  # (width, height) of point files (tora.trajectory's canvas)


def to_canvas(pixels: np.ndarray, video_hw: tuple[int, int], canvas_size=CANVAS_SIZE) -> np.ndarray:
    """Integer video pixels [..., 2] (x, y) -> integer canvas points that ``tora.trajectory.
    to_video_pixels`` (x' = x W // canvas_w) maps back onto exactly these pixels.

    x = ceil(x' canvas_w / W) is that point when W <= canvas_w (then x W / canvas_w < x' + 1).
    """
    (height, width), (canvas_w, canvas_h) = video_hw, canvas_size
    if width > canvas_w or height > canvas_h:
        raise MovingObjectsError(f"a {height}x{width} video has pixels no point of the {canvas_w}x{canvas_h} "
                                 f"canvas reaches; held-out point files need width <= {canvas_w} and "
                                 f"height <= {canvas_h}")
    pixels = np.asarray(pixels, np.int64)
    return np.stack([-(-pixels[..., 0] * canvas_w // width), -(-pixels[..., 1] * canvas_h // height)], axis=-1)


def write_point_file(path: Path, canvas_points: np.ndarray) -> None:
    """One ``x,y`` line per frame (the project's point-file format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{x},{y}\n" for x, y in np.asarray(canvas_points).tolist()))


def held_out_clip(index: int, seed: int, cfg: GeneratorConfig) -> ClipSpec:
    """Held-out clip ``index``: a random clip of the held-out split whose centres are moved onto
    whole pixels (those a point file can request), so that the requested path is the clip's path."""
    clip = random_clip("held_out", seed, index, cfg)
    clip.centres = np.rint(clip.centres)
    return clip


def resample_by_time(points: np.ndarray, num_frames: int) -> np.ndarray:
    """Point-file points [n, 2] -> [num_frames, 2] float: every point takes the same time, as in
    the file (repeated points stay pauses), linearly interpolated; nothing is dropped."""
    u = np.linspace(0, len(points) - 1, num_frames)
    return np.stack([np.interp(u, np.arange(len(points)), points[:, axis]) for axis in (0, 1)], axis=1)


def trajectory_groups(trajs_dir: Path) -> dict[str, list[Path]]:
    """Point files of a folder grouped into cases: ``<base>_a.txt``, ``<base>_b.txt`` ... are one
    case with several objects, every other file a case of its own.  Sorted by name."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(Path(trajs_dir).glob("*.txt")):
        match = re.fullmatch(r"(.+)_([a-z])", path.stem)
        groups.setdefault(match.group(1) if match else path.stem, []).append(path)
    if not groups:
        raise MovingObjectsError(f"no point files (*.txt) in {trajs_dir}")
    return groups


def trajectory_clip(index: int, name: str, files: Sequence[Path], seed: int, cfg: GeneratorConfig) -> ClipSpec:
    """Objects following the point files of one case: each file re-timed to the clip's frames
    (``resample_by_time``), scaled to video pixels, shrunk into the frame where the object would
    leave it (``fit_inside``) and rounded to whole pixels.  Looks drawn from split "trajs"."""
    rng = clip_rng("trajs", seed, index)
    background_name, background, textured = make_background(rng, cfg)
    scale = np.array([cfg.width / CANVAS_SIZE[0], cfg.height / CANVAS_SIZE[1]])
    shrink = 1.0
    for attempt in range(1, 10 * cfg.max_attempts + 1):
        sprites = random_sprites(rng, cfg, shrink, count=len(files), background=background_name)
        centres = []
        for sprite, path in zip(sprites, files):
            points = np.asarray(read_point_file(path, CANVAS_SIZE), np.float64)
            box = centre_box(sprite.extent, cfg.height, cfg.width)
            centres.append(np.rint(fit_inside(resample_by_time(points, cfg.num_frames) * scale, box)))
        centres = np.stack(centres)
        if apart(sprites, centres, cfg.min_gap):
            return ClipSpec(f"trajs_{name}", [SPLITS["trajs"], seed, index], sprites, centres, background_name,
                            background, textured, [f"file:{path.name}" for path in files], ["file"] * len(files))
        if attempt % cfg.max_attempts == 0:
            shrink *= 0.85
    raise MovingObjectsError(f"{', '.join(map(str, files))}: the objects cannot be kept apart")


def write_held_out(out: Path, clips: Sequence[ClipSpec], cfg: GeneratorConfig) -> Path:
    """The held-out folder of ``clips`` (already written as clips by ``write_random_clip``):

        points/<name>_<k>.txt   object k's requested path: one canvas point per frame
        images/<name>.png       the first frame (image-to-video input)
        prompts.txt             one caption per line, in manifest order
        prompts_i2v.txt         ``caption@@<name>.png`` lines (pass ``--img_dir <out>/images``)
        cases_t2v.jsonl, cases_i2v.jsonl   the same cases with their own point files (and image), for
                                one ``sample_video.py --input-file`` run over all of them
        cases/<name>.txt        the case's caption alone, and ``cases/<name>_i2v.txt`` its I2V line:
                                sample_video.py applies its --point_path to every prompt of a call,
                                so a case (own point files) is one call
        manifest.json           per case: name, caption, point files, image, requested pixels, seed

    Returns the manifest path.  With ``num_frames`` points per file no resampling rule of
    ``tora.trajectory`` changes them (n = F: the official rule keeps every point)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cases = []
    for clip in clips:
        pixels = clip.centres.astype(np.int64)  # [N, F, 2], whole pixels by construction
        point_files = []
        for k, track in enumerate(pixels):
            point_file = out / "points" / f"{clip.name}_{k}.txt"
            write_point_file(point_file, to_canvas(track, (cfg.height, cfg.width)))
            point_files.append(str(point_file.relative_to(out)))
        Image.fromarray(render_frames(clip.background, clip.sprites, clip.centres[:, :1])[0]).save(
            out / "images" / f"{clip.name}.png")
        (out / "cases").mkdir(exist_ok=True)
        (out / "cases" / f"{clip.name}.txt").write_text(clip.caption + "\n")
        (out / "cases" / f"{clip.name}_i2v.txt").write_text(f"{clip.caption}@@{clip.name}.png\n")
        cases.append({"name": clip.name, "caption": clip.caption, "point_files": point_files,
                      "prompt_file": f"cases/{clip.name}.txt", "prompt_file_i2v": f"cases/{clip.name}_i2v.txt",
                      "image": f"images/{clip.name}.png", "video": f"videos/{clip.name}.mp4",
                      "seed": clip.seed, "objects": [sprite.name for sprite in clip.sprites],
                      "requested_pixels_xy": pixels.tolist()})
    for mode, image in (("t2v", False), ("i2v", True)):  # case files: sample_video.py --input-file
        lines = [json.dumps({"prompt": case["caption"], "point_path": case["point_files"],
                             **({"image": case["image"]} if image else {})}) for case in cases]
        (out / f"cases_{mode}.jsonl").write_text("".join(line + "\n" for line in lines))
    (out / "prompts.txt").write_text("".join(case["caption"] + "\n" for case in cases))
    (out / "prompts_i2v.txt").write_text("".join(f"{case['caption']}@@{case['name']}.png\n" for case in cases))
    manifest = out / "manifest.json"
    manifest.write_text(json.dumps({"video_size_hw": [cfg.height, cfg.width], "num_frames": cfg.num_frames,
                                    "fps": cfg.fps, "canvas_size": list(CANVAS_SIZE), "cases": cases}, indent=1) + "\n")
    return manifest
