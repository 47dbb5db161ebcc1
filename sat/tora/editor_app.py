"""The trajectory editor behind ``sat/app.py``: a Gradio page over the sampling engine.

    browser (app_static/editor.js)            this module                          library
    drawn tracks, editor pixels  ──state──►   Session.preview / generate / export ──► tora.tracks (geometry,
    editable tracks             ◄──payload──  Session.load_* / transfer                timing, files),
                                                                                   tora.trajectory (motion
                                                                                   video, overlay), ToraEngine

The page talks to the editor through two JSON strings: ``state`` (what the editor holds, read by every
button through its ``js`` hook) and ``payload`` (written by Python into a hidden textbox whose change
event calls ``toraEditor.load``).  Every ``Session`` method returns plain values and reports bad input
as a message (``Reply.message``), so the page never shows a stack trace; the methods are tested
without a browser.

Generation writes, per run, into ``server.output_dir/<run>/``: the video and overlay mp4s, one point
file per track (one point per frame), ``tracks.json``, ``tracks.npy`` + ``visibility.npy``,
``prompt.txt`` and ``sample_video.sh``, the ``sat/sample_video.py`` command that makes the same video
from those point files with the same seed.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import shlex
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError

from .config import ConfigError, load_config, load_yaml, merge
from .errors import ToraError
from .trajectory import LINE_COLOURS, draw_trajectories, tracks_to_video
from .tracks import (Track, TrackError, arrays_from_tracks, canvas_to_editor, editor_to_canvas,
                     load_arrays, per_frame_video_pixels, read_point_files, time_tracks, tracks_document,
                     tracks_from_arrays, tracks_from_document, write_point_files)
from .video_io import write_mp4

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
STATIC = Path(__file__).resolve().parents[1] / "app_static"
DEFAULT_SETTINGS = REPO / "configs/tora/app.yaml"
NO_RECIPE = "none"


# ----------------------------------------------------------------------------------------------
# Settings (configs/tora/app.yaml)
# ----------------------------------------------------------------------------------------------

@dataclass
class AppModel:
    base: List[str] = field(default_factory=list)  # config files, as sample_video.py --base
    load: Optional[str] = None  # DiT checkpoint, as --load
    description: str = ""  # shown on the page; empty = random or trained, from the UNTRAINED marker


@dataclass
class AppEditor:
    width_px: int = 576
    freehand_interval_ms: int = 40
    background_grey: int = 128
    max_clip_frames: int = 200  # motion transfer reads at most this many frames of a reference clip


@dataclass
class AppGenerate:
    prompt: str = ""
    seed: int = 1234
    steps: int = 50
    guidance: float = 6.0
    memory_recipes: str = "configs/tora/memory"


@dataclass
class AppServer:
    host: str = "127.0.0.1"
    port: int = 7860
    output_dir: str = "samples/app"


@dataclass
class AppSettings:
    model: AppModel = field(default_factory=AppModel)
    editor: AppEditor = field(default_factory=AppEditor)
    generate: AppGenerate = field(default_factory=AppGenerate)
    server: AppServer = field(default_factory=AppServer)


def load_settings(path: str | Path = DEFAULT_SETTINGS) -> DictConfig:
    """The app's settings file on its schema: unknown keys and wrong types are errors naming the key."""
    schema = OmegaConf.structured(AppSettings)
    OmegaConf.set_struct(schema, True)
    settings = merge(schema, load_yaml(path), str(path))
    if settings.editor.width_px < 64:
        raise ConfigError(f"'editor.width_px' = {settings.editor.width_px} must be >= 64 (in {path})")
    if not settings.model.base:
        raise ConfigError(f"'model.base' lists no config file (in {path})")
    return settings


# ----------------------------------------------------------------------------------------------
# Replies to the page
# ----------------------------------------------------------------------------------------------

@dataclass
class Reply:
    message: str = ""  # Markdown for the status line; errors start with "**Error:**"
    payload: Optional[str] = None  # JSON for toraEditor.load, or None to leave the editor alone
    files: list[str] = field(default_factory=list)
    videos: tuple[Optional[str], Optional[str]] = (None, None)


def error(err: Exception | str) -> Reply:
    return Reply(message=f"**Error:** {err}")


USER_ERRORS = (ToraError, ValueError, FileNotFoundError)  # reported in the page; anything else is a bug


# ----------------------------------------------------------------------------------------------
# The session: one model, the editor's geometry, the buttons' work
# ----------------------------------------------------------------------------------------------

class Session:
    def __init__(self, settings: DictConfig, bases: Sequence[str] = (), load: Optional[str] = None,
                 overrides: Sequence[str] = (), device: Optional[str] = None):
        self.settings = settings
        self.bases = [str(b) for b in bases] or [str(Path(b)) for b in settings.model.base]
        self.load = load if bases else (load or (str(Path(settings.model.load)) if settings.model.load else None))
        self.overrides = list(overrides)
        self.device = device
        self.cfg = load_config(self.bases, self.overrides)  # validated now: a bad config fails at start
        p = self.cfg.model.network_config.params
        self.video_size_hw = (p.latent_height * 8, p.latent_width * 8)
        self.canvas_size = (self.cfg.trajectory.canvas_width, self.cfg.trajectory.canvas_height)
        self.image2video = bool(self.cfg.model.noised_image_input)
        height, width = self.video_size_hw
        self.editor_size = (settings.editor.width_px, round(settings.editor.width_px * height / width))
        self.output_root = Path(settings.server.output_dir)
        self._engine, self._engine_key, self._lock, self._runs = None, None, threading.Lock(), 0

    # -- what the page shows ---------------------------------------------------------------------
    def model_description(self) -> str:
        from .engine import UNTRAINED_MARKER

        kind = "image-to-video" if self.image2video else "text-to-video"
        h, w = self.video_size_hw
        if self.settings.model.description and not self.bases_given():
            what = self.settings.model.description
        elif self.load and (Path(self.load) / UNTRAINED_MARKER).exists():
            what = ("**random, untrained weights** (a tiny demo model): the videos show no real content, "
                    "but the whole pipeline and the motion conditioning run as with real weights")
        elif self.load:
            what = f"trained weights from `{self.load}`"
        else:
            what = "**random weights** (no checkpoint given)"
        return f"Model: {kind}, {w}x{h}, up to {self.frame_choices()[-1]} frames; {what}."

    def bases_given(self) -> bool:
        return self.bases != [str(Path(b)) for b in self.settings.model.base]

    def frame_choices(self) -> list[int]:
        """Frame counts the model can make with tracks: 1 + tc (T - 1) for odd latent counts T >= 3."""
        p = self.cfg.model.network_config.params
        tc, max_latent = p.time_compressed_rate, (p.num_frames - 1) // p.time_compressed_rate + 1
        return [(t - 1) * tc + 1 for t in range(3, max_latent + 1, 2)]

    def recipes(self) -> list[str]:
        folder = Path(self.settings.generate.memory_recipes)
        return [NO_RECIPE] + sorted(p.stem for p in folder.glob("*.yaml"))

    def recipe_file(self, recipe: str) -> list[str]:
        if recipe in (None, "", NO_RECIPE):
            return []
        if recipe not in self.recipes():
            raise ConfigError(f"unknown memory recipe {recipe!r}; choose one of {self.recipes()}")
        return [str(Path(self.settings.generate.memory_recipes) / f"{recipe}.yaml")]

    def presets(self) -> list[str]:
        return sorted(p.name for p in (REPO / "trajs").glob("*.txt"))

    # -- editor <-> tracks -----------------------------------------------------------------------
    def tracks_from_state(self, state: str) -> list[Track]:
        """The editor's JSON ({"editor_size": [w, h], "tracks": [{"points": [[x, y], ...], "static"}]})
        -> tracks on the trajectory canvas."""
        try:
            data = json.loads(state or "{}")
            size = tuple(float(v) for v in data.get("editor_size", self.editor_size))
            tracks = [Track(editor_to_canvas(item["points"], size, self.canvas_size) if item["points"] else [],
                            bool(item.get("static", False)), str(item.get("name", "")))
                      for item in data.get("tracks", [])]
        except (ValueError, KeyError, TypeError) as err:
            raise TrackError(f"the editor sent malformed tracks ({err})") from None
        return tracks

    def payload(self, tracks: Sequence[Track] = (), replace: bool = True, background: Optional[str] = None,
                animation: Optional[list] = None) -> str:
        """JSON for ``toraEditor.load``: canvas size, tracks in editor pixels, optional background
        (data URL) and per-frame points to animate (editor pixels, [track][frame] = [x, y])."""
        self._runs += 1
        return json.dumps({
            "nonce": self._runs, "width": self.editor_size[0], "height": self.editor_size[1],
            "replace": replace, "background": background, "animation": animation,
            "freehand_interval_ms": self.settings.editor.freehand_interval_ms,
            "colours": ["#%02x%02x%02x" % c for c in LINE_COLOURS],
            "tracks": [{"points": canvas_to_editor(t.points, self.editor_size, self.canvas_size).round(2).tolist(),
                        "static": t.static, "name": t.name} for t in tracks],
        })

    def initial_payload(self) -> str:
        return self.payload([], replace=False, background=self.background_data_url(None))

    # -- images ----------------------------------------------------------------------------------
    def first_frame(self, image_path: Optional[str]) -> np.ndarray:
        """The first frame [H, W, 3] uint8 at the video size: the upload (resized as
        ``args.image_resize``) or a blank grey frame."""
        from .sampling import load_image

        if not image_path:
            return np.full((*self.video_size_hw, 3), self.settings.editor.background_grey, dtype=np.uint8)
        try:
            Image.open(image_path).verify()
        except (UnidentifiedImageError, OSError) as err:
            raise TrackError(f"the upload {Path(image_path).name} is not an image ({type(err).__name__})") from None
        pixels = load_image(Path(image_path), self.video_size_hw, self.cfg.args.image_resize)  # [1, 3, H, W]
        return ((pixels[0].permute(1, 2, 0) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()

    def background_data_url(self, image_path: Optional[str]) -> str:
        buffer = io.BytesIO()
        Image.fromarray(self.first_frame(image_path)).resize(self.editor_size, Image.BICUBIC).save(buffer, "PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    # -- buttons ---------------------------------------------------------------------------------
    def set_image(self, image_path: Optional[str]) -> Reply:
        try:
            return Reply("Canvas background updated." if image_path else "Blank canvas.",
                         self.payload([], replace=False, background=self.background_data_url(image_path)))
        except USER_ERRORS as err:
            return error(err)

    def load_preset(self, name: str) -> Reply:
        try:
            if name not in self.presets():
                raise TrackError(f"no preset {name!r} in trajs/")
            tracks = read_point_files([REPO / "trajs" / name], self.canvas_size)
            return Reply(f"Added preset `{name}`.", self.payload(tracks, replace=False))
        except USER_ERRORS as err:
            return error(err)

    def import_files(self, paths: Sequence[str] | None) -> Reply:
        """Point files (.txt), a tracks JSON (.json) or tracks.npy (+ visibility.npy, in the model's
        video pixels) -> tracks added to the editor."""
        try:
            paths = [Path(p) for p in (paths or [])]
            if not paths:
                raise TrackError("choose files to import (.txt point files, tracks .json, tracks.npy + visibility.npy)")
            by_kind = {ext: [p for p in paths if p.suffix.lower() == ext] for ext in (".txt", ".json", ".npy")}
            other = [p.name for p in paths if p.suffix.lower() not in by_kind]
            if other:
                raise TrackError(f"cannot import {', '.join(other)}: expected .txt, .json or .npy files")
            tracks = read_point_files(by_kind[".txt"], self.canvas_size)
            for path in by_kind[".json"]:
                tracks += tracks_from_document(path.read_text(), path.name, self.canvas_size)
            if by_kind[".npy"]:
                tracks += self._tracks_from_npy(by_kind[".npy"])
            return Reply(f"Imported {len(tracks)} track(s).", self.payload(tracks, replace=False))
        except USER_ERRORS as err:
            return error(err)

    def _tracks_from_npy(self, paths: list[Path]) -> list[Track]:
        visibility = [p for p in paths if "visib" in p.stem.lower()]
        positions = [p for p in paths if p not in visibility]
        if len(positions) != 1 or len(visibility) > 1:
            raise TrackError("import one tracks.npy [frames, points, 2] (and at most one visibility.npy)")
        arrays = load_arrays(positions[0], visibility[0] if visibility else None)
        return tracks_from_arrays(*arrays, self.video_size_hw, self.canvas_size, positions[0].name)

    def _timed(self, state: str, timing: str, frames: int):
        tracks = self.tracks_from_state(state)
        frames = int(frames)
        if frames not in self.frame_choices():
            raise TrackError(f"{frames} frames: this model makes {self.frame_choices()}")
        return tracks, time_tracks(tracks, frames, timing), frames

    def _new_run_dir(self, kind: str) -> Path:
        self.output_root.mkdir(parents=True, exist_ok=True)
        index = 1 + max([int(p.name.split("-")[-1]) for p in self.output_root.glob(f"{kind}-*")
                         if p.name.split("-")[-1].isdigit()] + [0])
        folder = self.output_root / f"{kind}-{index:04d}"
        folder.mkdir()
        return folder

    def _write_track_files(self, folder: Path, tracks, timed, timing: str, frames: int) -> list[Path]:
        files = write_point_files(folder, timed)
        document = tracks_document(tracks, frames, timing, self.canvas_size, self.video_size_hw)
        (folder / "tracks.json").write_text(json.dumps(document, indent=1))
        positions, visibility = arrays_from_tracks(timed, self.canvas_size, self.video_size_hw)
        np.save(folder / "tracks.npy", positions)
        np.save(folder / "visibility.npy", visibility)
        return files + [folder / "tracks.json", folder / "tracks.npy", folder / "visibility.npy"]

    def export(self, state: str, timing: str, frames: int) -> Reply:
        try:
            tracks, timed, frames = self._timed(state, timing, frames)
            folder = self._new_run_dir("export")
            files = self._write_track_files(folder, tracks, timed, timing, frames)
            return Reply(f"Exported {len(tracks)} track(s), {frames} points each, to `{folder}`.",
                         files=[str(f) for f in files])
        except USER_ERRORS as err:
            return error(err)

    def preview(self, state: str, timing: str, frames: int, image_path: Optional[str]) -> Reply:
        """The per-frame points over the first frame, beside the flow-colour motion video the model gets."""
        try:
            tracks, timed, frames = self._timed(state, timing, frames)
            pixels = per_frame_video_pixels(timed, self.canvas_size, self.video_size_hw)  # [N, F, 2]
            first = self.first_frame(image_path)
            points_video = draw_trajectories(np.repeat(first[None], frames, axis=0), pixels.numpy())
            flow_image = tracks_to_video(pixels, self.video_size_hw, self.cfg.trajectory).flow_image
            motion = flow_image.permute(0, 2, 3, 1).numpy()  # [F, H, W, 3]
            folder = self._new_run_dir("preview")
            path = folder / "preview.mp4"
            write_mp4(path, np.concatenate([points_video, motion], axis=2), self.cfg.args.sampling_fps)
            animation = [canvas_to_editor(t, self.editor_size, self.canvas_size).round(2).tolist() for t in timed]
            message = (f"Preview: {len(tracks)} track(s), {frames} frames, timing {timing}. Left: the "
                       "per-frame points; right: the motion video (flow colours) the model receives.")
            return Reply(message, self.payload([], replace=False, animation=animation),
                         videos=(str(path), None))
        except USER_ERRORS as err:
            return error(err)

    # -- generation ------------------------------------------------------------------------------
    def generation_config(self, recipe: str, steps: int, guidance: float) -> tuple[list[str], list[str], DictConfig]:
        bases = self.bases + self.recipe_file(recipe)
        guider = "model.sampler_config.params.guider_config.params"  # dynamic CFG counts the steps too
        overrides = self.overrides + [f"model.sampler_config.params.num_steps={int(steps)}",
                                      f"{guider}.num_steps={int(steps)}", f"{guider}.scale={float(guidance)}"]
        return bases, overrides, load_config(bases, overrides)

    def engine_for(self, recipe: str, cfg: DictConfig):
        """The engine for a memory recipe (rebuilt when the recipe changes), its sampler from ``cfg``."""
        from .diffusion import VPSDEDPMPP2MSampler
        from .engine import ToraEngine
        from .runtime import pick_device
        from .sampling import resolve_dtype

        if self._engine is None or self._engine_key != recipe:
            self._engine = None  # free the old one first
            device = pick_device(self.device or cfg.args.device)
            self._engine = ToraEngine.from_config(cfg, self.load, device=str(device),
                                                  dtype=resolve_dtype(cfg.args, device), offload=cfg.args.offload)
            self._engine_key = recipe
        self._engine.sampler = VPSDEDPMPP2MSampler.from_config(cfg.model.sampler_config, self._engine.denoiser)
        return self._engine

    def warm_up(self) -> None:
        """Build the engine for the default recipe now (the first Generate then starts sampling at once)."""
        settings = self.settings.generate
        try:
            with self._lock:
                self.engine_for(NO_RECIPE, self.generation_config(NO_RECIPE, settings.steps, settings.guidance)[2])
        except Exception as err:  # noqa: BLE001 - reported again, as a message, by the first Generate
            logger.error("building the model failed: %s", err)

    def generate(self, state: str, timing: str, frames: int, prompt: str, seed: int, steps: int,
                 guidance: float, recipe: str, image_path: Optional[str],
                 progress: Callable[[int, int], None] = lambda step, total: None) -> Reply:
        """Sample one video from the drawn tracks; ``progress(step, total)`` after each denoising step."""
        try:
            tracks, timed, frames = self._timed(state, timing, frames)
            if self.image2video and not image_path:
                raise TrackError("this is an image-to-video model: upload a first frame")
            if not (prompt or "").strip():
                raise TrackError("write a prompt")
            bases, overrides, cfg = self.generation_config(recipe, steps, guidance)
            folder = self._new_run_dir("run")
            track_files = self._write_track_files(folder, tracks, timed, timing, frames)
            point_files = track_files[:len(tracks)]
            (folder / "prompt.txt").write_text(prompt.strip().replace("\n", " ") + ("@@first_frame.png" if self.image2video else "") + "\n")
            image = None
            if self.image2video:
                from .sampling import load_image

                self.first_frame(image_path)  # validates the upload
                Image.open(image_path).convert("RGB").save(folder / "first_frame.png")
                image = load_image(folder / "first_frame.png", self.video_size_hw, cfg.args.image_resize)
            with self._lock:
                engine = self.engine_for(recipe, cfg)
                latent_frames = engine.latent_frames_for(frames)
                total, done = engine.sampler.num_steps, [0]

                def step(_):
                    done[0] += 1
                    progress(done[0], total)

                generation = engine.generate(prompt.strip(), [str(f) for f in point_files], image=image,
                                             seed=int(seed), num_frames=frames, progress=step)
            video, overlay = folder / "video.mp4", folder / "overlay.mp4"
            write_mp4(video, generation.frames, cfg.args.sampling_fps, cfg.args.video_crf)
            write_mp4(overlay, generation.overlay(), cfg.args.sampling_fps, cfg.args.video_crf)
            command = self.sample_command(bases, overrides, folder, point_files, int(seed), latent_frames)
            (folder / "sample_video.sh").write_text(command + "\n")
            files = [video, overlay] + track_files + [folder / "prompt.txt", folder / "sample_video.sh"]
            return Reply(f"Generated {frames} frames with {len(tracks)} track(s), seed {int(seed)}, "
                         f"{total} steps (`{folder}`).", files=[str(f) for f in files],
                         videos=(str(video), str(overlay)))
        except USER_ERRORS as err:
            return error(err)

    def sample_command(self, bases, overrides, folder: Path, point_files, seed: int, latent_frames: int) -> str:
        """The sample_video.py command that makes the same video from the written files."""
        parts = ["python", "sat/sample_video.py", "--base", *bases]
        if self.load:
            parts += ["--load", self.load]
        if self.image2video:
            parts += ["--image2video", "--img_dir", str(folder)]
        parts += ["--point_path", *map(str, point_files), "--input-file", str(folder / "prompt.txt"),
                  "--seed", str(seed), "--sampling-num-frames", str(latent_frames),
                  "--output-dir", str(folder / "sample_video"), *overrides]
        return shlex.join(parts)

    # -- motion transfer -------------------------------------------------------------------------
    def transfer(self, clip_path: Optional[str], starts_text: str, count: int) -> Reply:
        """Tracks from a reference clip: the clicked start points ("x,y" per line, clip pixels), or
        ``count`` points where it moves."""
        from .motion_transfer import moving_start_points, parse_points, point_tracker, read_clip, transfer_tracks

        try:
            if not clip_path:
                raise TrackError("upload a reference clip first")
            frames = read_clip(clip_path, self.settings.editor.max_clip_frames)
            tracker = point_tracker()
            lines = [line.strip() for line in (starts_text or "").splitlines() if line.strip()]
            starts = (parse_points(lines, frames.shape[1:3], "start point") if lines
                      else moving_start_points(frames, int(count), tracker))
            tracks = transfer_tracks(frames, starts, tracker, self.canvas_size, Path(clip_path).name)
            return Reply(f"Tracked {len(tracks)} point(s) through {len(frames)} frames of "
                         f"`{Path(clip_path).name}`; they are editable tracks now.", self.payload(tracks, replace=False))
        except USER_ERRORS as err:
            return error(err)

    def clip_first_frame(self, clip_path: Optional[str]) -> tuple[Optional[np.ndarray], str]:
        from .motion_transfer import read_clip

        if not clip_path:
            return None, ""
        try:
            frames = read_clip(clip_path, max_frames=2)
            h, w = frames.shape[1:3]
            return frames[0], f"Clip {w}x{h}: click its first frame to add start points, or ask for N points."
        except USER_ERRORS as err:
            return None, f"**Error:** {err}"
