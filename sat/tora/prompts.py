"""Prompts: prompt files, stdin prompts and the image-to-video first frames they name.

Prompt files: UTF-8 (a byte-order mark is accepted), one prompt per line; blank lines and lines starting
with '#' are skipped.  Image-to-video lines are ``prompt@@image_name`` with the image looked up in
``args.img_dir`` (default: the prompt file's folder).  Prompt k counts prompts, not lines, from 0.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image

from . import runtime
from .errors import ToraError
from .files import read_user_text

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
    for number, line in enumerate(read_user_text(path, "prompt file").splitlines(), start=1):
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
    for number, line in enumerate(read_user_text(path, "case file").splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            specs.append(parse_case(line, len(specs), f"{path}:{number}", path.parent, image2video))
    if not specs:
        raise PromptError(f"{path} holds no case (one JSON object per line)")
    return specs


def parse_case(line: str, index: int, source: str, folder: Path, image2video: bool) -> PromptSpec:
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
    points = [str(folder / p) for p in points]
    for point_file in points:
        if not Path(point_file).is_file():
            raise PromptError(f"{source}: trajectory file not found: {point_file}")
    image = None
    if image2video:
        if not isinstance(case.get("image"), str):
            raise PromptError(f"{source}: image-to-video cases need an \"image\"")
        image = folder / case["image"]
        if not image.is_file():
            raise PromptError(f"{source}: image not found: {image}")
    return PromptSpec(index, case["prompt"].strip(), image, source, points)


def read_prompts(path: Path, image2video: bool, img_dir: Optional[Path]) -> list[PromptSpec]:
    """A prompt file, or a case file (``.jsonl``)."""
    if path.suffix == ".jsonl":
        return read_case_file(path, image2video)
    return read_prompt_file(path, image2video, img_dir)


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
