"""Every sampling input checked before a model is built (at full size the models take minutes to load).

``check_sampling_inputs(cfg)`` reads and validates, in this order: the resolution settings, the frame
count (``--sampling-num-frames``, in latent frames as typed), the trajectory files, ``--image2video``
against the model config, the prompts and their images (decoded), the weight paths (DiT, VAE, T5) and the output folder; each error names the
flag or config key and the file and line.  What it read comes back as a :class:`SamplingInputs`, so
nothing is parsed twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig
from PIL import Image

from .checkpoint import CheckpointError, resolve_checkpoint
from .config import ConfigError
from .files import check_output_folder
from .prompts import IMAGE_SEPARATOR, PromptError, PromptSpec, read_prompts
from .text import check_t5_folders
from .trajectory import Point, read_point_file

NETWORK = "model.network_config.params"
FRAMES_FLAG = "--sampling-num-frames (args.sampling_num_frames)"


@dataclass
class SamplingInputs:
    prompts: Optional[list[PromptSpec]]  # None: typed on stdin (--input-type cli), checked line by line
    trajectory_files: list[str]
    trajectory_points: dict[str, list[Point]] = field(default_factory=dict)  # canvas points per file
    num_frames: Optional[int] = None  # video frames; None = the model's
    checkpoint: Optional[Path] = None  # the resolved DiT file
    iteration: Optional[int] = None


def check_sampling_inputs(cfg: DictConfig, output_subfolders: tuple[str, ...]) -> SamplingInputs:
    args = cfg.args
    check_resolution(cfg.model.network_config.params)
    trajectory_files = [] if args.no_flow_injection else [str(p) for p in args.point_path]
    num_frames = check_frames(args.sampling_num_frames, cfg.model.network_config.params, bool(trajectory_files))
    canvas = (cfg.trajectory.canvas_width, cfg.trajectory.canvas_height)
    points = {path: read_point_file(path, canvas, cfg.trajectory.out_of_canvas) for path in trajectory_files}
    check_mode(cfg)
    check_run_settings(args)
    prompts = check_prompts(args)
    case_files = [] if args.no_flow_injection else [p for spec in prompts or [] for p in spec.point_paths or []]
    for path in case_files:  # case files: each prompt's own trajectory files
        points.setdefault(path, read_point_file(path, canvas, cfg.trajectory.out_of_canvas))
    if case_files and not trajectory_files:  # the frame count must suit trajectories after all
        check_frames(args.sampling_num_frames, cfg.model.network_config.params, True)
    checkpoint, iteration = resolve_checkpoint(args.load) if args.load else (None, None)
    check_vae_and_t5(cfg)
    check_output_folder(args.output_dir, output_subfolders, what="output folder (--output-dir)")
    return SamplingInputs(prompts, trajectory_files, points, num_frames, checkpoint, iteration)


def check_resolution(params: DictConfig) -> None:
    """Latent height and width must be whole numbers of DiT patches (the rotary table and the patch
    embedding both assume it)."""
    for key in ("latent_height", "latent_width"):
        value = params[key]
        if value < 1 or value % params.patch_size:
            raise ConfigError(f"'{NETWORK}.{key}' = {value}: must be a positive multiple of the patch size "
                              f"{params.patch_size} ('{NETWORK}.patch_size'); the video is 8x the latent size, "
                              f"e.g. {key} = {max(1, value // params.patch_size) * params.patch_size} "
                              f"-> {max(1, value // params.patch_size) * params.patch_size * 8} pixels")


def valid_latent_frames(params: DictConfig, with_trajectories: bool) -> list[int]:
    """Odd counts up to the model's (the causal VAE decodes T latents to 1 + 4(T-1) frames only for odd
    T); a trajectory needs at least 2 video frames."""
    most = (params.num_frames - 1) // params.time_compressed_rate + 1
    return [t for t in range(3 if with_trajectories else 1, most + 1, 2)]


def check_frames(latent_frames: Optional[int], params: DictConfig, with_trajectories: bool) -> Optional[int]:
    """``--sampling-num-frames`` (latent frames, as typed) -> video frames; None keeps the model's."""
    if latent_frames is None:
        return None
    rate = params.time_compressed_rate
    valid = valid_latent_frames(params, with_trajectories)
    if not valid:
        raise ConfigError(f"this model ({NETWORK}.num_frames = {params.num_frames}) makes single frames; "
                          f"a trajectory needs at least 2 (pass --no-flow-injection)")
    if latent_frames not in valid:
        shown = ", ".join(f"{t} ({(t - 1) * rate + 1} frames)" for t in valid)
        reason = ("must be odd" if latent_frames % 2 == 0 and 0 < latent_frames <= valid[-1]
                  else "is out of range")
        raise ConfigError(f"{FRAMES_FLAG} = {latent_frames} {reason}: it counts latent frames, and this model "
                          f"({NETWORK}.num_frames = {params.num_frames}) takes {shown}"
                          f"{' with trajectories' if with_trajectories else ''}; leave it out for "
                          f"{valid[-1]} ({params.num_frames} frames)")
    return (latent_frames - 1) * rate + 1


SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts
CRF_RANGE = (0, 51)  # libx264's quality scale (0 = lossless)


def check_run_settings(args: DictConfig) -> None:
    """Settings that would otherwise fail only when the first video is seeded or encoded."""
    if not SEED_RANGE[0] <= args.seed < SEED_RANGE[1]:
        raise ConfigError(f"--seed (args.seed) = {args.seed} is out of range [{SEED_RANGE[0]}, {SEED_RANGE[1]})")
    if not CRF_RANGE[0] <= args.video_crf <= CRF_RANGE[1]:
        raise ConfigError(f"'args.video_crf' = {args.video_crf}: libx264 quality must be in "
                          f"{CRF_RANGE[0]}..{CRF_RANGE[1]} (lower is better; official 18)")
    if args.sampling_fps <= 0:
        raise ConfigError(f"'args.sampling_fps' = {args.sampling_fps}: the frame rate must be positive")


I2V_CONFIGS = ("configs/tora/model/cogvideox_5b_tora_i2v.yaml after cogvideox_5b_tora.yaml, or "
               "configs/tora/model/tora_tiny_i2v.yaml after tora_tiny.yaml")


def check_mode(cfg: DictConfig) -> None:
    """--image2video and the model config must agree (an I2V DiT takes the first-frame latent as input)."""
    if cfg.args.image2video and not cfg.model.noised_image_input:
        raise ConfigError(f"--image2video needs an image-to-video model config (model.noised_image_input: "
                          f"true): stack {I2V_CONFIGS}, and --load the I2V weights")
    if cfg.model.noised_image_input and not cfg.args.image2video:
        raise ConfigError("this is an image-to-video model config (model.noised_image_input: true): pass "
                          "--image2video, with prompt lines 'prompt@@image_name'")


def check_prompts(args: DictConfig) -> Optional[list[PromptSpec]]:
    if args.input_type == "cli":
        return None
    if not args.input_file:
        raise PromptError("no prompts: pass --input-file FILE (or --input-type cli)")
    specs = read_prompts(Path(args.input_file), args.image2video, image_folder(args))
    for spec in specs:
        if spec.image_path is not None:
            check_image(spec)
        elif IMAGE_SEPARATOR in spec.text:
            raise PromptError(f"{spec.source}: the prompt names an image ('{IMAGE_SEPARATOR}'), but this is a "
                              f"text-to-video run: pass --image2video and stack {I2V_CONFIGS}")
    return specs


def image_folder(args: DictConfig) -> Optional[Path]:
    """``--img_dir``, else the prompt file's folder."""
    if args.img_dir:
        return Path(args.img_dir)
    return Path(args.input_file).parent if args.input_file else None


def check_image(spec: PromptSpec) -> None:
    """Decode the whole image once: a truncated or mislabelled file fails here, not after the models."""
    try:
        with Image.open(spec.image_path) as image:
            image.convert("RGB")
    except Exception as err:
        raise PromptError(f"{spec.source}: cannot read image {spec.image_path}: {err}") from None


def check_vae_and_t5(cfg: DictConfig) -> None:
    vae_path = cfg.model.first_stage_config.params.ckpt_path
    if vae_path is None or not Path(vae_path).is_file():
        raise CheckpointError(f"VAE checkpoint not found: {vae_path} "
                              f"('model.first_stage_config.params.ckpt_path'; see README 'Weights')")
    for embedder in cfg.model.conditioner_config.params.emb_models:
        model_dir = Path(embedder.params.model_dir)
        tokenizer_dir = Path(embedder.params.tokenizer_dir) if embedder.params.tokenizer_dir else model_dir
        check_t5_folders(model_dir, tokenizer_dir)

