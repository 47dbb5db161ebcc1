"""The sampling run behind ``sat/sample_video.py``: prompts in, videos out, split over ranks.

Prompt files: one prompt per line (blank lines and lines starting with '#' are skipped); for
image-to-video ``prompt@@image_name`` with the image looked up in ``args.img_dir``.  Case files
(``.jsonl``, :func:`read_case_file`) give each prompt its own trajectory files (and image).  Prompt k (0-based,
counting prompts, not lines) goes to rank k mod world_size (with CFG parallel: to rank pair k mod
world_size/2) and uses seed ``args.seed + k``, so a result does not depend on how many GPUs made it.

Per sample, under ``args.output_dir`` (never overwriting: an existing name gets a ``-1``, ``-2`` ... suffix):

    video/<name>.mp4        the video (libx264)
    traj_video/<name>.mp4   the same video with the trajectories drawn over it
    traj/<name>.json        the per-frame trajectory points (video pixels) and the files they came from
    prompt/<name>.txt       the prompt
    latents/<name>.safetensors  the sampled latents, with ``args.save_latents``
"""
from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from .errors import ToraError
from . import runtime
from .engine import ToraEngine
from .video_io import write_mp4

logger = logging.getLogger(__name__)

IMAGE_SEPARATOR = "@@"


class PromptError(ToraError, ValueError):
    pass


@dataclass
class PromptSpec:
    index: int  # 0-based prompt number (seed offset, output name)
    text: str
    image_path: Optional[Path] = None
    source: str = ""  # "file:line" for messages
    point_paths: Optional[list[str]] = None  # this prompt's trajectory files (case files); None: --point_path


def parse_prompt(line: str, index: int, source: str, image2video: bool, img_dir: Optional[Path]) -> PromptSpec:
    text = line.strip()
    if not image2video:
        return PromptSpec(index, text, None, source)
    if IMAGE_SEPARATOR not in text:
        raise PromptError(f"{source}: image-to-video prompts must look like 'prompt{IMAGE_SEPARATOR}image_name', "
                          f"got {text!r}")
    text, image_name = (part.strip() for part in text.rsplit(IMAGE_SEPARATOR, 1))
    image_path = (img_dir or Path(".")) / image_name
    if not image_name or not image_path.is_file():
        raise PromptError(f"{source}: image not found: {image_path} (set --img_dir to the folder holding it)")
    return PromptSpec(index, text, image_path, source)


def read_prompt_file(path: Path, image2video: bool, img_dir: Optional[Path]) -> list[PromptSpec]:
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}")
    specs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            specs.append(parse_prompt(line, len(specs), f"{path}:{number}", image2video, img_dir))
    if not specs:
        raise PromptError(f"{path} holds no prompt (one prompt per line)")
    return specs


def read_case_file(path: Path, image2video: bool) -> list[PromptSpec]:
    """A case file (``.jsonl``): one JSON object per line, each a prompt with its own trajectories,
    ``{"prompt": "...", "point_path": ["a.txt", ...], "image": "first.png"}`` (``image`` for
    image-to-video only; ``point_path`` may be empty).  Relative paths are relative to the file's
    folder.  For evaluation sets and batches of different trajectories in one run."""
    if not path.is_file():
        raise PromptError(f"case file not found: {path}")
    specs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        source = f"{path}:{number}"
        try:
            case = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptError(f"{source}: not a JSON object ({err.msg})") from None
        if not isinstance(case, dict) or not isinstance(case.get("prompt"), str):
            raise PromptError(f"{source}: each line needs a \"prompt\" string")
        unknown = set(case) - {"prompt", "point_path", "image"}
        if unknown:
            raise PromptError(f"{source}: unknown field(s) {sorted(unknown)} (known: prompt, point_path, image)")
        points = case.get("point_path", [])
        if not isinstance(points, list) or not all(isinstance(p, str) for p in points):
            raise PromptError(f"{source}: \"point_path\" must be a list of file names")
        points = [str(path.parent / p) for p in points]
        for point_file in points:
            if not Path(point_file).is_file():
                raise PromptError(f"{source}: trajectory file not found: {point_file}")
        image = None
        if image2video:
            if not isinstance(case.get("image"), str):
                raise PromptError(f"{source}: image-to-video cases need an \"image\"")
            image = path.parent / case["image"]
            if not image.is_file():
                raise PromptError(f"{source}: image not found: {image}")
        specs.append(PromptSpec(len(specs), case["prompt"].strip(), image, source, points))
    if not specs:
        raise PromptError(f"{path} holds no case (one JSON object per line)")
    return specs


def prompts_from_stdin(image2video: bool, img_dir: Optional[Path]) -> Iterator[PromptSpec]:
    """Interactive prompts (``--input-type cli``): rank 0 reads, every rank receives the same lines."""
    index = 0
    while True:
        line = None
        if runtime.is_main_process():
            if sys.stdin.isatty():
                print("prompt (empty line or Ctrl-D to finish)> ", end="", flush=True)
            line = sys.stdin.readline()
        if runtime.world_size() > 1:
            holder = [line]
            torch.distributed.broadcast_object_list(holder, src=0)
            line = holder[0]
        if not line or not line.strip():
            return
        try:
            yield parse_prompt(line, index, f"stdin line {index + 1}", image2video, img_dir)
        except PromptError as err:  # a typo should not end an interactive session
            logger.error("%s", err)
            continue
        index += 1


def load_image(path: Path, size_hw: tuple[int, int], resize: str = "stretch") -> torch.Tensor:
    """RGB image -> [1, 3, H, W] in [-1, 1] at the video size (official: bicubic stretch)."""
    try:
        image = Image.open(path).convert("RGB")
    except Exception as err:
        raise PromptError(f"cannot read image {path}: {err}") from None
    height, width = size_hw
    if resize == "crop":  # cover the target, then centre crop: keeps the aspect ratio
        scale = max(width / image.width, height / image.height)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
    else:
        image = image.resize((width, height), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    return (pixels * 2 - 1)[None]


# ----------------------------------------------------------------------------------------------
# Output files
# ----------------------------------------------------------------------------------------------

def slug(text: str, limit: int = 60) -> str:
    """Filesystem-safe short name of a prompt."""
    cleaned = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")
    return cleaned[:limit] or "prompt"


class OutputWriter:
    SUBDIRS = {"video": ".mp4", "traj_video": ".mp4", "traj": ".json", "prompt": ".txt", "latents": ".safetensors"}

    def __init__(self, root: Path, fps: int, crf: int, save_latents: bool = False):
        self.root, self.fps, self.crf, self.save_latents = root, fps, crf, save_latents
        for sub in self.SUBDIRS:
            if sub != "latents" or save_latents:  # no empty latents/ folder in every output
                (root / sub).mkdir(parents=True, exist_ok=True)

    def free_name(self, base: str) -> str:
        """``base`` or ``base-1``, ``base-2`` ...: the first name no output file uses yet."""
        name, n = base, 0
        while any((self.root / sub / f"{name}{ext}").exists() for sub, ext in self.SUBDIRS.items()):
            n += 1
            name = f"{base}-{n}"
        return name

    def write(self, spec: PromptSpec, seed: int, generation, trajectory_files: list[str]) -> Path:
        name = self.free_name(f"{spec.index:04d}_{slug(spec.text)}_seed{seed}")
        (self.root / "prompt" / f"{name}.txt").write_text(spec.text + "\n")
        if self.save_latents:  # sampler latents [1, T, 16, h, w] (scaled): decode later or compare runs
            save_file({"latents": generation.latents.contiguous().cpu()},
                      str(self.root / "latents" / f"{name}.safetensors"))
        write_mp4(self.root / "video" / f"{name}.mp4", generation.frames, self.fps, self.crf)
        if generation.tracks is not None:
            write_mp4(self.root / "traj_video" / f"{name}.mp4", generation.overlay(), self.fps, self.crf)
            points = {"files": trajectory_files, "video_size_hw": list(generation.frames.shape[1:3]),
                      "points_xy": generation.tracks.tolist()}
            (self.root / "traj" / f"{name}.json").write_text(json.dumps(points))
        return self.root / "video" / f"{name}.mp4"


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def resolve_dtype(args: DictConfig, device: torch.device) -> torch.dtype:
    if args.bf16 is not None and args.dtype == "auto":
        return torch.bfloat16 if args.bf16 else torch.float32
    return runtime.default_dtype(device) if args.dtype == "auto" else runtime.DTYPES[args.dtype]


def run_sampling(cfg: DictConfig) -> list[Path]:
    """Sample every prompt of this rank; returns the written video paths."""
    args = cfg.args
    if args.input_type == "txt" and not args.input_file:
        raise PromptError("no prompts: pass --input-file FILE (or --input-type cli)")
    img_dir = Path(args.img_dir) if args.img_dir else (Path(args.input_file).parent if args.input_file else None)
    if args.input_type == "txt" and Path(args.input_file).suffix == ".jsonl":
        specs = iter(read_case_file(Path(args.input_file), args.image2video))
    elif args.input_type == "txt":
        specs = iter(read_prompt_file(Path(args.input_file), args.image2video, img_dir))
    else:
        specs = prompts_from_stdin(args.image2video, img_dir)
    trajectory_files = [] if args.no_flow_injection else list(args.point_path)
    device = runtime.pick_device(args.device)
    engine = ToraEngine.from_config(cfg, args.load, device=str(device), dtype=resolve_dtype(args, device),
                                    offload=args.offload)
    num_frames = None
    if args.sampling_num_frames:
        num_frames = (args.sampling_num_frames - 1) * engine.time_compression + 1
    writer = OutputWriter(Path(args.output_dir), args.sampling_fps, args.video_crf, args.save_latents)
    rank = runtime.rank()
    # Prompts are split over workers: single ranks, or rank pairs sharing one video (CFG parallel).
    worker, workers, writes = rank, runtime.world_size(), True
    if engine.cfg_group is not None:
        _, half, worker, workers = engine.cfg_group
        writes = half == 0
    written = []
    for spec in specs:
        if spec.index % workers != worker:
            continue
        seed = args.seed + spec.index
        files = trajectory_files if spec.point_paths is None or args.no_flow_injection else spec.point_paths
        image = load_image(spec.image_path, engine.video_size_hw, args.image_resize) if spec.image_path else None
        logger.info("[rank %d] prompt %d (seed %d): %s", rank, spec.index, seed, spec.text)
        with tqdm(total=engine.sampler.num_steps, desc=f"prompt {spec.index}", disable=rank != 0,
                  leave=False) as bar:
            generation = engine.generate(spec.text, files, image=image, seed=seed,
                                         num_frames=num_frames, progress=lambda _: bar.update())
        if writes:
            path = writer.write(spec, seed, generation, files)
            logger.info("[rank %d] wrote %s", rank, path)
            written.append(path)
    return written
