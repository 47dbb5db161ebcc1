"""The sampling run behind ``sat/sample_video.py``: prompts in, videos out, split over ranks.

Every input (prompts and their images, trajectory files, frame count, resolution, weight paths, output
folder) is checked before a model is built (``tora.preflight``).  Case files (``.jsonl``,
``tora.prompts.read_case_file``) give each prompt its own trajectory files (and image).  Prompt k
(0-based, counting prompts, not lines; see ``tora.prompts``) goes to rank k mod world_size (with CFG
parallel: to rank pair k mod world_size/2) and uses seed ``args.seed + k``, so a result does not depend on how many GPUs made it.

Per sample, under ``args.output_dir`` (never overwriting: an existing name gets a ``-1``, ``-2`` ... suffix):

    video/<name>.mp4        the video (libx264)
    video/<name>.json       what made it: resolved config, checkpoint, image, trajectory points, seed, versions
    traj_video/<name>.mp4   the same video with the trajectories drawn over it
    traj/<name>.json        the per-frame trajectory points (video pixels) and the files they came from
    prompt/<name>.txt       the prompt
    latents/<name>.safetensors  the sampled latents, with ``args.save_latents``

A sample's files are written to temporary names and renamed together at the end (``tora.files``): a
failure (a full disk, an encoder error) leaves none of them, half-written or alone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from tqdm import tqdm

from . import runtime
from .engine import ToraEngine
from .files import StagedFiles
from .preflight import SamplingInputs, check_sampling_inputs, image_folder
from .prompts import PromptError, PromptSpec, load_image, prompts_from_stdin, read_prompt_file  # noqa: F401
from .video_io import encode_mp4

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# Output files
# ----------------------------------------------------------------------------------------------

def slug(text: str, limit: int = 60) -> str:
    """Filesystem-safe short name of a prompt."""
    cleaned = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")
    return cleaned[:limit] or "prompt"


class OutputWriter:
    # (folder, suffix) of every file a sample may have; a name is free when none of them exists
    OUTPUTS = (("video", ".mp4"), ("video", ".json"), ("traj_video", ".mp4"), ("traj", ".json"),
               ("prompt", ".txt"), ("latents", ".safetensors"))

    def __init__(self, root: Path, fps: int, crf: int, save_latents: bool = False):
        self.root, self.fps, self.crf, self.save_latents = root, fps, crf, save_latents
        for sub in self.folders(save_latents):
            (root / sub).mkdir(parents=True, exist_ok=True)

    @classmethod
    def folders(cls, save_latents: bool) -> tuple[str, ...]:
        """The output folders (no empty latents/ folder unless latents are saved)."""
        return tuple(dict.fromkeys(sub for sub, _ in cls.OUTPUTS if sub != "latents" or save_latents))

    def taken(self, name: str) -> bool:
        return any((self.root / sub / f"{name}{ext}").exists() for sub, ext in self.OUTPUTS)

    def write(self, spec: PromptSpec, seed: int, generation, trajectory_files: list[str],
              record: dict) -> Path:
        """Stage every file of one sample, then give them the first free name together."""
        base = f"{spec.index:04d}_{slug(spec.text)}_seed{seed}"
        with StagedFiles() as staged:
            def stage(sub: str, ext: str) -> Path:
                return staged.path(self.root / sub / f"{base}{ext}")

            stage("prompt", ".txt").write_text(spec.text + "\n", encoding="utf-8")
            if self.save_latents:  # sampler latents [1, T, 16, h, w] (scaled): decode later or compare runs
                save_file({"latents": generation.latents.contiguous().cpu()}, str(stage("latents", ".safetensors")))
            encode_mp4(stage("video", ".mp4"), generation.frames, self.fps, self.crf)
            if generation.tracks is not None:
                encode_mp4(stage("traj_video", ".mp4"), generation.overlay(), self.fps, self.crf)
                points = {"files": trajectory_files, "video_size_hw": list(generation.frames.shape[1:3]),
                          "points_xy": generation.tracks.tolist()}
                stage("traj", ".json").write_text(json.dumps(points))
            stage("video", ".json").write_text(json.dumps(record, indent=1))
            name = self.claim(staged, base)
        return self.root / "video" / f"{name}.mp4"

    def claim(self, staged: StagedFiles, base: str) -> str:
        """Rename the staged files to ``base`` or ``base-1``, ``base-2`` ...: the first name no output
        uses yet.  Exclusive: a sampler writing into the same folder at the same moment never loses
        its files to ours (a clash moves on to the next name)."""
        places = [(final.parent, final.name[len(base):]) for final in staged.finals()]  # (folder, suffix)
        n = 0
        while True:
            name = base if n == 0 else f"{base}-{n}"
            if not self.taken(name):
                staged.retarget([folder / f"{name}{suffix}" for folder, suffix in places])
                try:
                    staged.commit(exclusive=True)
                    return name
                except FileExistsError:
                    pass
            n += 1


# ----------------------------------------------------------------------------------------------
# What made a sample
# ----------------------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit() -> Optional[dict]:
    """The project's commit (and whether the tree had changes), or None outside a git checkout."""
    def git(*command):
        return subprocess.run(["git", "-C", str(REPO), *command], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": head.stdout.strip(), "uncommitted_changes": dirty}


def run_record(cfg: DictConfig, inputs: SamplingInputs) -> dict:
    """The per-run part of every sample's record (computed once)."""
    import diffusers
    import transformers
    checkpoint = None
    if inputs.checkpoint is not None:
        checkpoint = {"load": cfg.args.load, "file": str(inputs.checkpoint.resolve()),
                      "iteration": inputs.iteration, "bytes": inputs.checkpoint.stat().st_size}
    return {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "checkpoint": checkpoint,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "tora": git_commit()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def sample_record(run: dict, inputs: SamplingInputs, spec: PromptSpec, seed: int, files: list[str],
                  generation) -> dict:
    trajectories = [{"file": str(Path(path).resolve()), "sha256": sha256(Path(path)),
                     "points_xy_canvas": [list(p) for p in inputs.trajectory_points[path]]} for path in files]
    image = None
    if spec.image_path is not None:
        image = {"file": str(spec.image_path.resolve()), "sha256": sha256(spec.image_path)}
    frames, height, width, _ = generation.frames.shape
    return {"prompt": spec.text, "prompt_number": spec.index, "prompt_source": spec.source, "seed": seed,
            "image": image, "frames": frames, "video_size_hw": [height, width], "trajectories": trajectories,
            **run}


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------

class SampleProgress:
    """One bar per prompt, from the first denoising step to the written files:
    ``prompt 2 of 5:  6%|#  | 3/52 [00:04<01:10, denoising]``: 50 steps, then decoding, then writing."""

    def __init__(self, spec: PromptSpec, total_prompts: Optional[int], num_steps: int, enabled: bool):
        self.desc = f"prompt {spec.index + 1}" + (f" of {total_prompts}" if total_prompts else "")
        self.num_steps, self.enabled, self.bar = num_steps, enabled, None

    def stage(self, name: str) -> None:
        if self.bar is None:  # starts with the denoising loop: prompt/image/motion encoding is not a step
            self.bar = tqdm(total=self.num_steps + 2, desc=self.desc, unit="step", postfix=name,
                            disable=not self.enabled)
            return
        if name != "denoising":
            self.bar.n = max(self.bar.n, self.num_steps + (name == "writing"))
        self.bar.set_postfix_str(name)

    def step(self, _index: int) -> None:
        self.bar.update()

    def close(self, outcome: str) -> None:
        if self.bar is not None:
            if outcome == "done":
                self.bar.n = self.bar.total
            self.bar.set_postfix_str(outcome)
            self.bar.close()


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
    # before any model is built: bad input fails in seconds, not after minutes of loading
    inputs = check_sampling_inputs(cfg, OutputWriter.folders(args.save_latents))
    specs = inputs.prompts if inputs.prompts is not None else prompts_from_stdin(args.image2video,
                                                                                 image_folder(args))
    device = runtime.pick_device(args.device)
    engine = ToraEngine.from_config(cfg, args.load, device=str(device), dtype=resolve_dtype(args, device),
                                    offload=args.offload)
    writer = OutputWriter(Path(args.output_dir), args.sampling_fps, args.video_crf, args.save_latents)
    run = run_record(cfg, inputs)
    rank = runtime.rank()
    # Prompts are split over workers: single ranks, or rank pairs sharing one video (CFG parallel).
    worker, workers, writes = rank, runtime.world_size(), True
    if engine.cfg_group is not None:
        _, half, worker, workers = engine.cfg_group
        writes = half == 0
    total = len(inputs.prompts) if inputs.prompts is not None else None
    written = []
    for spec in specs:
        if spec.index % workers != worker:
            continue
        seed = args.seed + spec.index
        image = load_image(spec.image_path, engine.video_size_hw, args.image_resize) if spec.image_path else None
        logger.info("[rank %d] prompt %d (seed %d): %s", rank, spec.index, seed, spec.text)
        files = inputs.trajectory_files if spec.point_paths is None or args.no_flow_injection else spec.point_paths
        progress = SampleProgress(spec, total, engine.sampler.num_steps, enabled=rank == 0)
        try:
            generation = engine.generate(spec.text, files, image=image, seed=seed,
                                         num_frames=inputs.num_frames, progress=progress.step,
                                         stage=progress.stage)
            if writes:
                progress.stage("writing")
                written.append(writer.write(spec, seed, generation, files,
                                            sample_record(run, inputs, spec, seed, files, generation)))
        except BaseException:
            progress.close("failed")
            raise
        progress.close("done")
        if writes:
            logger.info("[rank %d] wrote %s", rank, written[-1])
    return written
