"""Fine-tuning Tora's motion modules (spec 7): the training step, the loop around SAT's
``training_main``, checkpoints and resume.

One training step, per micro-batch of clips (everything above the line is frozen and runs without
autograd; only the DiT's ``trainable_modules`` get gradients)::

    clip [F, 3, H, W] --RAFT--> flows --dense: all flows / sparse: tracked keypoints (blurred)-->
        motion flow --flow_to_rgb--> motion video --VAE--> motion latents [B, T, 16, h, w]
    clip --VAE--> x0 = 0.7 * posterior sample                               [B, T, 16, h, w]
    caption --T5--> context, zeroed per sample w.p. 0.1                     [B, L, 4096]
    I2V: noisy first frame --VAE--> image latent + zero frames, zeroed w.p. 0.05 (concat)
    ---------------------------------------------------------------------------------------
    loss = VideoDiffusionLoss(DiT, x0, context, concat, video_flow=motion latents)   (v-MSE)

The sparse motion goes through ``trajectory.tracks_to_video``, the function that also turns the
point files of sampling into motion videos; ``trajectory.blur_border`` and
``trajectory.flow_image_chunk_frames`` select the official training numerics (zero border, colours
per 2 frames) or the sampling ones (reflect-101, all frames) - spec 10.6.

Randomness: every draw of step k (keypoints, posterior samples, timesteps, noise, dropouts) comes
from generators seeded by (seed, k, micro-batch, data-parallel rank), and the global RNG is reseeded
the same way; clips come from epoch-wise shuffles seeded by (seed, epoch) (``StepBatchSampler``)
and each item is seeded by (seed, epoch, index) (``data.SFTDataset``).  So the RNG and data
position of a run are functions of the iteration: a resumed run replays the same steps.

SAT's ``training_main`` drives the loop (DeepSpeed engine, train_step, logging, save interval);
:meth:`Trainer.sat_replacements` lists the SAT functions replaced for one run and why.

Run folder ``<save>/<experiment_name>-MM-DD-HH-MM/`` (or the folder given to ``--resume``)::

    latest                                 last complete checkpoint (the commit point of a save)
    <iter>/mp_rank_00_model_states.pt      the whole DiT, SAT layout: sample_video.py --load <run>
    <iter>/training_state.pt               iteration, world size, batch: what resume checks
    <iter>/deepspeed/                      DeepSpeed's files: ZeRO optimizer partitions + fp32
                                           master weights (one file per rank), trainable weights
    <iter>-ema/mp_rank_00_model_states.pt  the DiT with EMA weights (fp32) when args.ema_decay > 0
    metrics.jsonl                          one line per step (step, loss, lr, grad_norm, times ...)
    training_config.yaml, train.log        the merged config of the run; its log
    tensorboard/                           when args.tensorboard

A save writes everything into ``.incomplete-<iter>/``, renames the folders into place, then
rewrites ``latest`` atomically: a crash at any point leaves the previous checkpoint and ``latest``
intact.  Keeps the last ``args.keep_last_checkpoints`` checkpoints (0 = all).
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import sat_compat
from .checkpoint import (MODEL_FILE, CheckpointError, atomic_write_text, load_dit_checkpoint, load_into,
                         load_state_dict, read_dit_state, resolve_checkpoint)
from .config import ConfigError
from .diffusion import DiscreteDenoiser, VideoDiffusionLoss, conditioned_network, gaussian_noise
from .dit import DiffusionTransformer
from .runtime import DTYPES, default_dtype, pick_device
from .tracking import dense_motion_flow, farneback_flows, raft_flows, track_keypoints
from .trajectory import flow_to_rgb, rgb_to_video, tracks_to_video
from .vae import Posterior

logger = logging.getLogger(__name__)

DEEPSPEED_TAG = "deepspeed"  # <iter>/deepspeed/: DeepSpeed's own checkpoint files
TRAINING_STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "training_config.yaml"
RAFT_MIN_SIZE = 128  # RAFT's correlation pyramid needs frames of at least 128 x 128 pixels
# Parameters that the official base checkpoint (CogVideoX-5B) lacks: Tora's motion modules.
MOTION_MODULE_KEYS = ("traj_extractor.", "mixins.adaln_layer.fuser_list.")


# ----------------------------------------------------------------------------------------------
# Randomness per step
# ----------------------------------------------------------------------------------------------

# Purposes of the per-step random streams (see step_seed).
_GLOBAL, _CPU, _DEVICE = 0, 1, 2


def step_seed(seed: int, iteration: int, micro_batch: int, rank: int, stream: int) -> int:
    """A 63-bit seed that is a function of the run seed, the step and the data-parallel rank."""
    state = np.random.SeedSequence([seed, iteration, micro_batch, rank, stream]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


@dataclass
class StepRandom:
    """Generators of one micro-batch: ``cpu`` for small draws (keypoints, dropouts, I2V noise level),
    ``device`` for the rest (posterior samples, diffusion timesteps and noise)."""
    cpu: torch.Generator
    device: torch.Generator

    @classmethod
    def for_step(cls, seed: int, iteration: int, micro_batch: int, rank: int, device: torch.device) -> "StepRandom":
        torch.manual_seed(step_seed(seed, iteration, micro_batch, rank, _GLOBAL))  # anything else drawing
        cpu = torch.Generator().manual_seed(step_seed(seed, iteration, micro_batch, rank, _CPU))
        dev = torch.Generator(device).manual_seed(step_seed(seed, iteration, micro_batch, rank, _DEVICE))
        return cls(cpu, dev)


# ----------------------------------------------------------------------------------------------
# Motion from a training clip (the same motion-video path as sampling)
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def clip_flows(raft: Optional[nn.Module], clip: Tensor, cfg) -> Tensor:
    """Flows [F-1, H, W, 2] of a clip [F, 3, H, W] in [-1, 1]: ``tracking.raft_flows``, or
    ``tracking.farneback_flows`` with ``motion_from_video.flow_estimator: farneback`` (no RAFT).

    Full-size clips go straight through (official).  Frames below RAFT's 128-pixel minimum, or not a
    multiple of 8 (tiny demo/CI models), are resized (bilinear) for the flow estimate only; the flow
    is resized back and its vectors rescaled to the clip's pixels.
    """
    if cfg.flow_estimator == "farneback":
        return farneback_flows(clip, cfg).to(clip.device)
    height, width = clip.shape[-2:]
    scale = max(1.0, RAFT_MIN_SIZE / min(height, width))
    size = tuple(math.ceil(s * scale / 8) * 8 for s in (height, width))
    if size == (height, width):
        return raft_flows(raft, clip, cfg)
    frames = F.interpolate(clip.float(), size=size, mode="bilinear", align_corners=False)
    flows = raft_flows(raft, frames, cfg).permute(0, 3, 1, 2)  # [F-1, 2, h', w']
    flows = F.interpolate(flows, size=(height, width), mode="bilinear", align_corners=False)
    ratio = torch.tensor([width / size[1], height / size[0]], device=flows.device)
    return flows.permute(0, 2, 3, 1) * ratio


@torch.no_grad()
def motion_video_from_clip(clip: Tensor, raft: nn.Module, motion_cfg, trajectory_cfg,
                           generator: torch.Generator, flows: Optional[Tensor] = None) -> Tensor:
    """Training motion video [1, 3, F, H, W] in [-1, 1] (the VAE input) of a clip [F, 3, H, W].

    Stage "dense" (``motion_from_video.stage``): [zero flow, F-1 RAFT flows], no blur.  Stage
    "sparse": keypoints sampled on the first flow and tracked through the others
    (``tracking.track_keypoints``), then rasterised, blurred and coloured by
    ``trajectory.tracks_to_video`` - the function sampling uses for point files.  Colours are
    normalised per ``trajectory.flow_image_chunk_frames`` frames in both stages.  ``flows``: the
    clip's flows when already known (``args.cache_latents``).
    """
    flows = clip_flows(raft, clip, motion_cfg) if flows is None else flows
    if motion_cfg.stage == "dense":
        return rgb_to_video(flow_to_rgb(dense_motion_flow(flows), trajectory_cfg.flow_image_chunk_frames))
    if motion_cfg.stage != "sparse":
        raise ConfigError(f"unknown motion_from_video.stage {motion_cfg.stage!r}; choose 'dense' or 'sparse'")
    tracks = track_keypoints(flows, motion_cfg, generator)  # [F, N, 2] float (x, y), inside the frame
    pixels = tracks.round().long().permute(1, 0, 2)  # [N, F, 2]: the format of point-file tracks
    return tracks_to_video(pixels, tuple(clip.shape[-2:]), trajectory_cfg).video


# ----------------------------------------------------------------------------------------------
# Components and the frozen part of a step
# ----------------------------------------------------------------------------------------------

@dataclass
class Components:
    """What a training run needs besides the data: the DiT (trainable modules inside) and the
    frozen VAE, text conditioner (``text.GeneralConditioner``-like: ``__call__(prompts)`` and
    ``drop_text(context, generator)``) and RAFT."""
    dit: DiffusionTransformer
    vae: nn.Module
    conditioner: nn.Module
    raft: nn.Module


class BatchPreparer:
    """Batch of clips -> the DiT's training inputs, without autograd (RAFT, VAE and T5 are frozen)."""

    def __init__(self, cfg: DictConfig, components: Components, device: torch.device):
        self.cfg, self.device = cfg, device
        self.vae, self.conditioner, self.raft = components.vae, components.conditioner, components.raft
        self.scale_factor = cfg.model.scale_factor
        model = cfg.model
        if model.latent_input:
            raise ConfigError("model.latent_input = true (precomputed latents) is not supported for training")
        self.i2v = model.noised_image_input
        self.timing: dict[str, float] = {}
        # args.cache_latents: what is a function of the clip alone, computed once per clip (see
        # _cached): the clip's posterior moments, the dense stage's motion-video moments, the flows.
        self.cache: Optional[dict] = {} if cfg.args.cache_latents else None

    def _moments(self, video: Tensor) -> Tensor:
        return self.vae.encode(video.to(self.device)).moments

    def _cached(self, kind: str, clips: list[str], compute: Callable[[list[int]], Tensor]) -> Tensor:
        """``compute(indices)`` -> one tensor per batch item, stacked; with the cache on, only the
        clips not seen yet are computed, and the results are kept (per ``kind`` and clip path)."""
        if self.cache is None:
            return compute(list(range(len(clips))))
        missing = [i for i, clip in enumerate(clips) if (kind, clip) not in self.cache]
        if missing:
            for i, value in zip(missing, compute(missing)):
                self.cache[(kind, clips[i])] = value
        return torch.stack([self.cache[(kind, clip)] for clip in clips])

    def _sample(self, moments: Tensor, generator: torch.Generator) -> Tensor:
        """Posterior moments [B, 32, T, h, w] -> scale_factor * sample [B, T, 16, h, w] float32."""
        posterior = Posterior(moments)
        latents = posterior.sample(eps=gaussian_noise(generator)(posterior.mean))
        return (self.scale_factor * latents).permute(0, 2, 1, 3, 4).float()

    def _encode(self, video: Tensor, generator: torch.Generator) -> Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] -> 0.7 * posterior sample [B, T, 16, h, w] float32."""
        return self._sample(self._moments(video), generator)

    def _image_concat(self, video: Tensor, x0: Tensor, rng: StepRandom) -> Tensor:
        """I2V concat input (official ``shared_step``): the first frame plus N(0, sigma^2) noise with
        ln sigma ~ N(-3, 0.5^2), VAE-encoded, followed by zero latent frames (or repeated with
        ``noised_image_all_concat``); zeroed per sample with probability ``noised_image_dropout``."""
        batch = video.shape[0]
        first = video[:, :, :1]  # [B, 3, 1, H, W]
        sigma = torch.exp(torch.normal(-3.0, 0.5, (batch,), generator=rng.cpu)).to(self.device)
        noise = torch.randn(first.shape, generator=rng.device, device=self.device)
        image = self._encode(first + noise * sigma[:, None, None, None, None], rng.device)  # [B, 1, 16, h, w]
        if self.cfg.model.noised_image_all_concat:
            image = image.expand(-1, x0.shape[1], -1, -1, -1)
        else:
            image = torch.cat([image, torch.zeros_like(x0[:, 1:])], dim=1)
        keep = torch.rand(batch, generator=rng.cpu) >= self.cfg.model.noised_image_dropout
        return image * keep.to(self.device, image.dtype)[:, None, None, None, None]

    def _time(self, name: str, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timing[name] = self.timing.get(name, 0.0) + now - start
        return now

    @torch.no_grad()
    def __call__(self, batch: dict, rng: StepRandom) -> dict:
        """``batch``: SFTDataset items collated (``mp4`` [B, F, 3, H, W] in [-1, 1], ``txt``)."""
        self.timing = {}
        start = time.perf_counter()
        clips = batch["mp4"].to(self.device, non_blocking=True).float()
        names = list(batch.get("clip") or [str(i) for i in range(len(clips))])
        if self.cache is not None and "clip" not in batch:
            raise ConfigError("args.cache_latents needs the data items' clip paths (tora.data.SFTDataset)")
        motion_cfg = self.cfg.motion_from_video
        motion_latents = None  # stage "none": a plain text-to-video step
        given = batch.get("flows")  # computed by the data-loader workers (worker_flows)

        def flows_of(i: int) -> Tensor:
            return given[i].to(self.device, torch.float32) if given is not None else clip_flows(self.raft, clips[i], motion_cfg)

        if motion_cfg.stage == "dense":  # a function of the clip: cacheable as VAE moments
            def dense_moments(indices):
                motion = torch.cat([motion_video_from_clip(clips[i], self.raft, motion_cfg, self.cfg.trajectory,
                                                           rng.cpu, flows=flows_of(i)) for i in indices])
                return self._moments(motion)
            motion_latents = self._sample(self._cached("motion", names, dense_moments), rng.device)
        elif motion_cfg.stage == "sparse":  # random keypoints each step; the flows are the clip's
            flows = self._cached("flows", names, lambda indices: torch.stack(
                [flows_of(i).to(torch.bfloat16) for i in indices]))
            motion = torch.cat([motion_video_from_clip(clip, self.raft, motion_cfg, self.cfg.trajectory, rng.cpu,
                                                       flows=flow.float()) for clip, flow in zip(clips, flows)])
            motion_latents = self._encode(motion, rng.device)
        start = self._time("motion_s", start)
        video = clips.permute(0, 2, 1, 3, 4)  # [B, 3, F, H, W]
        x0 = self._sample(self._cached("x0", names, lambda indices: self._moments(video[indices])), rng.device)
        concat = self._image_concat(video, x0, rng) if self.i2v else None
        start = self._time("vae_s", start)
        context = self.conditioner.drop_text(self.conditioner(list(batch["txt"])).to(self.device), rng.cpu)
        self._time("text_s", start)
        return {"x0": x0, "context": context, "video_flow": motion_latents, "concat": concat,
                "generator": rng.device}


# ----------------------------------------------------------------------------------------------
# The module DeepSpeed trains
# ----------------------------------------------------------------------------------------------

def trainable_names(module: nn.Module, patterns) -> list[str]:
    """Names of the parameters whose name matches one of the regexes (official ``trainable_modules``)."""
    import re
    compiled = [re.compile(p) for p in patterns]
    return [name for name, _ in module.named_parameters() if any(c.search(name) for c in compiled)]


class ToraTrainingModule(nn.Module):
    """The DiT (as ``model.diffusion_model``, the official engine's key layout) and its loss.

    ``forward(inputs)`` (from :class:`BatchPreparer`) returns the mean v-prediction loss of the
    micro-batch.  SAT calls :meth:`disable_untrainable_params` before building the optimizer.
    """

    def __init__(self, dit: DiffusionTransformer, loss_fn: VideoDiffusionLoss, trainable_modules):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = dit
        self.loss_fn = loss_fn
        self.trainable_modules = list(trainable_modules)

    @property
    def dit(self) -> DiffusionTransformer:
        return self.model.diffusion_model

    def disable_untrainable_params(self) -> int:
        """Freeze every parameter outside ``trainable_modules``; returns (and logs) the trainable count."""
        names = set(trainable_names(self.dit, self.trainable_modules))
        if not names:
            raise ConfigError(f"model.trainable_modules {self.trainable_modules} match no DiT parameter")
        for name, param in self.dit.named_parameters():
            param.requires_grad_(name in names)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        logger.info("trainable parameters: %s of %s (%.2f %%) in modules matching %s",
                    f"{trainable:,}", f"{total:,}", 100 * trainable / total, self.trainable_modules)
        return trainable

    def forward(self, inputs: dict) -> Tensor:
        cond = {"crossattn": inputs["context"]}
        if inputs.get("concat") is not None:
            cond["concat"] = inputs["concat"]
        loss = self.loss_fn(conditioned_network(self.dit), inputs["x0"], cond, generator=inputs["generator"],
                            video_flow=inputs["video_flow"])
        return loss.mean()


class EMA:
    """Exponential moving average (fp32) of the trainable weights: e <- d e + (1 - d) w after every
    optimizer step (the official FusedEmaAdam's EMA, decay 0.9999).  Kept by global rank 0 only."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for name, param in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def state_dict(self, module: nn.Module) -> dict:
        """The module's state dict with the EMA weights in place of the trainable ones."""
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        state.update({k: v.cpu() for k, v in self.shadow.items()})
        return state


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def init_motion_modules_(dit: DiffusionTransformer, seed: int = 0) -> None:
    """The constructor's initialisation of the trajectory extractor and the fusers (fusers start as
    the identity: zero temporal convs), seeded: for training from a base without Tora modules."""
    with torch.random.fork_rng(devices=[dit.device] if dit.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for module in dit.traj_extractor.modules():
            if hasattr(module, "reset_parameters") and module is not dit.traj_extractor:
                module.reset_parameters()
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
        dit.traj_extractor.reset_parameters()
        for fuser in dit.fusers:
            for module in fuser.children():
                module.reset_parameters()
            for conv in (fuser.flow_gamma_temporal, fuser.flow_beta_temporal):
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)


def base_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder/file of ``args.load``; a CogVideoX ``*-sat`` download folder is accepted
    too (its weights live in ``transformer/``)."""
    path = Path(path)
    try:
        resolve_checkpoint(path)
        return path
    except CheckpointError:
        if (path / "transformer").is_dir():
            return path / "transformer"
        raise


def expand_patch_embedding_(state: dict, dit: DiffusionTransformer, file) -> None:
    """A text-to-video state (patch embedding over 16 latent channels) for an image-to-video DiT
    (32: noisy latent, then image latent): the image half of the input projection starts at zero,
    so the I2V model computes the T2V function until it learns to use the image (the way CogVideoX's
    I2V model was started from its T2V one).  ``state`` is changed in place."""
    own = dit.state_dict()
    for key, value in list(state.items()):
        if key not in own or own[key].shape == value.shape or "patch_embed" not in key:
            continue
        target = own[key].shape
        if value.dim() < 2 or value.shape[0] != target[0] or target[1] != 2 * value.shape[1]:
            raise CheckpointError(f"{file}: {key} has shape {tuple(value.shape)}, which cannot be expanded "
                                  f"to the model's {tuple(target)} (args.expand_input_channels)")
        # input features are (channels, patch, patch)-major: the first half is the noisy latent
        state[key] = torch.cat([value, torch.zeros_like(value)], dim=1)
        logger.info("%s: %s expanded %s -> %s, image channels zero (args.expand_input_channels)",
                    file, key, tuple(value.shape), tuple(target))


def load_base_weights(dit: DiffusionTransformer, path: str | os.PathLike, seed: int = 0,
                      expand_input_channels: bool = False) -> int | None:
    """Load ``args.load`` into the DiT: a Tora checkpoint (all keys), or the CogVideoX-5B SAT base,
    which lacks the motion modules - those get :func:`init_motion_modules_`.  Any other missing,
    unexpected or mis-shaped key is an error.  With ``expand_input_channels`` a text-to-video
    checkpoint loads into an image-to-video DiT (:func:`expand_patch_embedding_`).  Returns the
    checkpoint's iteration (or None)."""
    state, file, iteration = read_dit_state(base_checkpoint(path))
    if expand_input_channels:
        expand_patch_embedding_(state, dit, file)
    motion_keys = [k for k in dit.state_dict() if k.startswith(MOTION_MODULE_KEYS)]
    motion_missing = [k for k in motion_keys if k not in state]
    if motion_missing and len(motion_missing) == len(motion_keys):  # a base without Tora modules
        load_into(dit, state, str(file), exclude=MOTION_MODULE_KEYS)
        init_motion_modules_(dit, seed)
        logger.info("%s has no motion modules (%d tensors): trajectory extractor and fusers start from "
                    "their initialisation (fusers = identity)", file, len(motion_missing))
    else:  # a Tora checkpoint: everything must be there
        load_into(dit, state, str(file))
    return iteration


def build_components(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> Components:
    """The real components: the DiT with the weights of ``args.load``, VAE, T5, RAFT."""
    from .engine import build_dit
    from .text import build_conditioner
    from .tracking import load_raft
    from .vae import load_vae
    dit = build_dit(cfg, None, device, dtype, seed=cfg.args.seed)
    if cfg.args.load and not cfg.args.resume:  # resumed runs load their own checkpoint (Trainer.setup)
        load_base_weights(dit, cfg.args.load, seed=cfg.args.seed,
                          expand_input_channels=cfg.args.expand_input_channels)
    elif cfg.args.from_scratch and not cfg.args.resume:
        logger.info("training from scratch (args.from_scratch): the DiT starts from its initialisation")
    vae = load_vae(cfg.model.first_stage_config.params).to(device, dtype).requires_grad_(False).eval()
    conditioner = build_conditioner(cfg.model.conditioner_config, device=device, dtype=dtype)
    motion = cfg.motion_from_video
    raft = load_raft(motion, device) if motion.stage != "none" and motion.flow_estimator == "raft" else None
    return Components(dit, vae, conditioner.requires_grad_(False).eval(), raft)


def write_random_raft(path: str | os.PathLike, model: str = "raft_small", seed: int = 0,
                      if_missing: bool = False) -> Path:
    """Save a RANDOM-weight torchvision RAFT state dict (tiny demo, CI, benchmarks; no download)."""
    from .tracking import RAFT_VARIANTS
    path = Path(path)
    if if_missing and path.is_file():
        return path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = RAFT_VARIANTS[model][0](weights=None, progress=False).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


# ----------------------------------------------------------------------------------------------
# Data: epoch-wise shuffles, resumable at any step
# ----------------------------------------------------------------------------------------------

class StepBatchSampler(Sampler):
    """Endless micro-batches of dataset keys ``(epoch, index)`` for one data-parallel rank.

    Global sample g (counting micro-batches of all ranks in order) is item ``perm_e[g mod N]`` of
    epoch e = g div N, where ``perm_e`` is a permutation seeded by (seed, e): every epoch visits
    every clip once, ranks see disjoint samples, and micro-batch m of a rank is a function of m,
    so a run resumed at micro-batch m continues the same sequence.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start_micro_batch: int = 0):
        if num_items < 1:
            raise ValueError("StepBatchSampler needs at least one item")
        self.num_items, self.batch_size, self.rank, self.world_size = num_items, batch_size, rank, world_size
        self.seed, self.start = seed, start_micro_batch
        self._permutations: dict[int, np.ndarray] = {}

    def key(self, sample: int) -> tuple[int, int]:
        epoch, position = divmod(sample, self.num_items)
        if epoch not in self._permutations:
            self._permutations = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_items)}
        return epoch, int(self._permutations[epoch][position])

    def micro_batch(self, index: int) -> list[tuple[int, int]]:
        first = (index * self.world_size + self.rank) * self.batch_size
        return [self.key(first + j) for j in range(self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        index = self.start
        while True:
            yield self.micro_batch(index)
            index += 1


def worker_flows(motion_cfg) -> Optional[Callable[[Tensor], Tensor]]:
    """The flow function the data-loader workers run for each item: a CPU estimator (Farneback) runs
    there, in parallel over the workers; RAFT runs on the GPU in :class:`BatchPreparer`."""
    if motion_cfg.stage == "none" or motion_cfg.flow_estimator != "farneback":
        return None
    return functools.partial(farneback_flows, cfg=motion_cfg)


class EpochKeyed(Dataset):
    """``dataset[(epoch, index)]``: sets the epoch (per-item randomness of ``SFTDataset``) and reads."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------

def training_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype:
    """``args.dtype`` (auto: bf16 on GPU, fp32 on CPU; official ``args.bf16: true`` means bf16)."""
    if cfg.args.dtype != "auto":
        return DTYPES[cfg.args.dtype]
    if cfg.args.bf16:
        return torch.bfloat16
    return default_dtype(device)


def deepspeed_config(cfg: DictConfig, dtype: torch.dtype) -> dict:
    """The ``deepspeed:`` section made runnable: precision from the training dtype (bf16 or fp32;
    fp16 is not supported), torch's AdamW (``torch_adam``: no JIT-compiled op; the official
    ``sat.ops.FusedEmaAdam`` is a CUDA op - its EMA is ``args.ema_decay`` here)."""
    ds = copy.deepcopy(OmegaConf.to_container(cfg.deepspeed, resolve=True)) if cfg.deepspeed else {}
    if not isinstance(ds, dict):
        raise ConfigError("'deepspeed' must be a mapping (the DeepSpeed config)")
    if (ds.get("fp16") or {}).get("enabled"):
        raise ConfigError("deepspeed.fp16.enabled = true is not supported: Tora trains in bf16 (GPU) or fp32")
    ds["fp16"] = {"enabled": False}
    ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": dtype == torch.bfloat16}
    ds.setdefault("train_micro_batch_size_per_gpu", 1)
    ds.setdefault("gradient_accumulation_steps", 1)
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    zero = ds.setdefault("zero_optimization", {"stage": 2})
    if zero.get("stage", 0) not in (0, 1, 2):
        raise ConfigError(f"deepspeed.zero_optimization.stage = {zero.get('stage')} is not supported "
                          "(SAT's ZeRO-3 model construction fails; use 2, the official value)")
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    if str(optimizer.get("type", "")).endswith("FusedEmaAdam"):
        logger.info("deepspeed.optimizer %s (a CUDA op) -> torch AdamW; its EMA is args.ema_decay",
                    optimizer["type"])
        optimizer["type"] = "AdamW"
        for key in ("ema_decay", "adam_w_mode"):
            params.pop(key, None)
    if optimizer.get("type") not in ("Adam", "AdamW"):
        raise ConfigError(f"deepspeed.optimizer.type {optimizer.get('type')!r}: only Adam/AdamW are supported")
    params["torch_adam"] = True
    params.setdefault("lr", 1e-4)
    ds["zero_allow_untested_optimizer"] = True
    return ds


def check_training_config(cfg: DictConfig) -> None:
    a = cfg.args

    def fail(key: str, why: str):
        raise ConfigError(f"args.{key} = {a[key]!r}: {why}")

    if a.mode != "finetune":
        fail("mode", "train_video.py needs mode finetune (set by configs/tora/train_*.yaml)")
    if a.train_iters < 1:
        fail("train_iters", "must be >= 1")
    if a.seed < 1:
        fail("seed", "must be >= 1 (SAT asserts a positive seed)")
    if not a.train_data:
        fail("train_data", "name at least one data folder")
    if a.save_interval < 1 or a.log_interval < 1:
        fail("save_interval" if a.save_interval < 1 else "log_interval", "must be >= 1")
    if a.keep_last_checkpoints < 0:
        fail("keep_last_checkpoints", "must be >= 0 (0 keeps all)")
    if not 0.0 <= a.ema_decay < 1.0:
        fail("ema_decay", "must be in [0, 1) (0 = no EMA)")
    if a.auto_warmup_steps > 0 and a.warmup <= 0:
        fail("warmup", "must be > 0 while args.auto_warmup_steps > 0 (SAT's AnnealingLR divides by it)")
    if a.model_parallel_size != 1:
        fail("model_parallel_size", "only 1 is supported")
    if not a.resume and bool(a.load) == a.from_scratch:
        if a.from_scratch:
            fail("from_scratch", f"contradicts args.load = {a.load!r}: train from scratch or from weights, not both")
        fail("load", "name the starting weights with --load (stage 1: the CogVideoX-5B SAT transformer, stage 2: "
                     "the stage-1 run folder), or set args.from_scratch=true to start from the initialisation")
    if a.expand_input_channels and not (a.load and cfg.model.noised_image_input):
        fail("expand_input_channels", "needs args.load (a T2V checkpoint) and an I2V model (model.noised_image_input)")
    if a.valid_data:
        logger.warning("args.valid_data is ignored: there is no evaluation during training (official: off)")
    if cfg.model.noised_image_input != (cfg.model.network_config.params.in_channels == 32):
        raise ConfigError("model.noised_image_input must be true exactly for the I2V model "
                          "(network_config.params.in_channels 32)")


def sat_argv(cfg: DictConfig, deepspeed_json: str) -> list[str]:
    """SAT's command line for ``training_main`` from the config (official args names)."""
    a = cfg.args
    argv = ["--mode", "finetune", "--train-iters", str(a.train_iters), "--seed", str(a.seed),
            "--experiment-name", a.experiment_name, "--deepspeed_config", deepspeed_json,
            "--train-data", *[str(p) for p in a.train_data], "--num-workers", str(a.num_workers),
            "--log-interval", str(a.log_interval), "--save-interval", str(a.save_interval),
            "--save", str(a.save), "--warmup", str(a.warmup), "--lr-decay-style", a.lr_decay_style,
            "--lr-decay-ratio", str(a.lr_decay_ratio),
            "--num-layers", str(cfg.model.network_config.params.num_layers),
            "--hidden-dropout", "0", "--attention-dropout", "0", "--no-save-rng", "--no-load-rng"]
    if a.lr_decay_iters is not None:
        argv += ["--lr-decay-iters", str(a.lr_decay_iters)]
    if a.exit_interval:
        argv += ["--exit-interval", str(a.exit_interval)]
    if a.checkpoint_activations:
        argv += ["--checkpoint-activations"]
    return argv


def resumable_lr_scheduler(sat_factory, auto_warmup_steps: int = 100, auto_warmup_rate: float = 0.05):
    """SAT's ``get_learning_rate_scheduler`` (AnnealingLR), built at iteration 0 and advanced to the
    given iteration, so a resumed run continues the schedule exactly.  (SAT itself restarts a
    resumed schedule with another 100 auto-warmup steps, as it never restored the optimizer.)

    Official finetune schedule (spec 7.5, lr L, T = train_iters, W = warmup * T): step n (1-based)
    uses min(rate L, L n / W) for n <= auto_warmup_steps, L n / W up to W, then L (T - (n - W)) / T.
    """
    def build(optimizer, iteration, args):
        scheduler = sat_factory(optimizer, 0, args, auto_warmup_steps=auto_warmup_steps,
                                auto_warmup_rate=auto_warmup_rate)
        if iteration:
            scheduler.step(iteration + 1)  # the lr of step `iteration` (0-based) is f(iteration + 1)
        return scheduler
    return build


def config_changes(before: DictConfig, after: DictConfig,
                   ignore=("args.resume", "args.save", "args.experiment_name")) -> list[str]:
    """'key: old -> new' for every leaf that differs between two configs."""
    def leaves(node, prefix=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1], node
    old = dict(leaves(OmegaConf.to_container(before)))
    new = dict(leaves(OmegaConf.to_container(after)))
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and key not in ignore]


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def checkpoint_iterations(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in run_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_iteration(run_dir: Path) -> Optional[int]:
    latest = run_dir / "latest"
    return int(latest.read_text().strip()) if latest.is_file() else None


def prune_checkpoints(run_dir: Path, keep: int) -> list[int]:
    """Delete all but the ``keep`` newest checkpoints (and their ``-ema`` twins); never the one
    ``latest`` names.  keep 0 keeps everything.  Returns the deleted iterations."""
    if keep <= 0:
        return []
    latest = latest_iteration(run_dir)
    deleted = []
    for iteration in checkpoint_iterations(run_dir)[:-keep]:
        if iteration == latest:
            continue
        for name in (f"{iteration}-ema", str(iteration)):  # the model folder last
            shutil.rmtree(run_dir / name, ignore_errors=True)
        deleted.append(iteration)
    return deleted


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

@dataclass
class ResumePoint:
    iteration: int
    folder: Path  # <run>/<iteration>
    state: dict = field(default_factory=dict)


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _broadcast(value):
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]
    return value


class Trainer:
    """One training run on top of SAT's ``training_main``; see the module docstring.

    Typical use (``run_training`` does exactly this)::

        trainer = Trainer(cfg)            # SAT args, torch.distributed, DeepSpeed comm, run folder
        trainer.setup(build_components(trainer.cfg, trainer.device, trainer.dtype))
        trainer.run()
    """

    def __init__(self, cfg: DictConfig):
        check_training_config(cfg)
        cfg = copy.deepcopy(cfg)
        # args.checkpoint_activations (official key) switches the DiT's activation checkpointing.
        cfg.model.network_config.params.transformer_args.checkpoint_activations = cfg.args.checkpoint_activations
        self.cfg = cfg
        self.device = pick_device(cfg.args.device) if cfg.args.device else pick_device(None)
        self.dtype = training_dtype(cfg, self.device)
        self.ds_config = deepspeed_config(cfg, self.dtype)
        self.args = self._sat_args()
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.micro_batch = self.args.batch_size
        self.accumulation = self.args.gradient_accumulation_steps or 1
        self.run_dir = self._run_dir()
        self.resume = self._find_resume()
        self.start_iteration = self.resume.iteration if self.resume else 0
        self.saved_iteration = self.start_iteration
        self.ema: Optional[EMA] = None
        self._micro = (-1, 0)  # (iteration, micro-batch index) of the last forward step
        self._step_timing: dict = {}

    # -- process and folders ---------------------------------------------------------------------
    def _sat_args(self):
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="tora-ds-", delete=False) as file:
            json.dump(self.ds_config, file)
        try:
            args = sat_compat.sat_get_args(sat_argv(self.cfg, file.name))
        finally:
            os.unlink(file.name)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        return args

    def _run_dir(self) -> Path:
        if self.cfg.args.resume:
            run_dir = Path(self.cfg.args.resume)
            if not (run_dir / "latest").is_file():
                raise CheckpointError(f"cannot resume from {run_dir}: no 'latest' file (not a run folder "
                                      "of train_video.py, or no checkpoint was completed)")
            return run_dir
        stamp = _broadcast(datetime.now().strftime("%m-%d-%H-%M"))
        run_dir = Path(self.cfg.args.save) / f"{self.cfg.args.experiment_name}-{stamp}"
        if self.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        _barrier()
        return run_dir

    def _find_resume(self) -> Optional[ResumePoint]:
        if not self.cfg.args.resume:
            return None
        iteration = latest_iteration(self.run_dir)
        folder = self.run_dir / str(iteration)
        state = torch.load(folder / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
        now = {"world_size": self.world_size, "micro_batch": self.micro_batch, "accumulation": self.accumulation}
        for key, value in now.items():
            if state[key] != value:
                raise CheckpointError(
                    f"cannot resume {self.run_dir} at iteration {iteration}: it was trained with {key} "
                    f"{state[key]}, this run has {value} (the ZeRO optimizer partitions and the data "
                    f"order depend on it).  To continue from its weights with a fresh optimizer, start a "
                    f"new run with --load {self.run_dir}")
        logger.info("resuming %s at iteration %d", self.run_dir, iteration)
        return ResumePoint(iteration, folder, state)

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, components: Components, dataset=None) -> None:
        """Wrap the components, load the resumed weights, open the data and the metrics file."""
        cfg = self.cfg
        dit = components.dit
        if self.resume is not None:
            load_dit_checkpoint(dit, self.resume.folder)
        denoiser = DiscreteDenoiser.from_config(cfg.model.denoiser_config)
        loss_fn = VideoDiffusionLoss.from_config(cfg.model.loss_fn_config, denoiser, self.rank, self.world_size)
        self.module = ToraTrainingModule(dit, loss_fn, cfg.model.trainable_modules)
        self.preparer = BatchPreparer(cfg, components, self.device)
        if dataset is None:
            from .data import SFTDataset
            dataset = SFTDataset(list(cfg.args.train_data), cfg.data.params, seed=cfg.args.seed,
                                 flows=worker_flows(cfg.motion_from_video))
        self.dataset = dataset
        self.metrics_path = self.run_dir / METRICS_FILE
        if self.rank == 0:
            self._write_run_files()
        _barrier()

    def _write_run_files(self) -> None:
        config_file = self.run_dir / CONFIG_FILE
        if self.resume is not None and config_file.is_file():
            changed = config_changes(OmegaConf.load(config_file), self.cfg)
            if changed:
                logger.warning("resuming with settings that differ from the run's %s: %s", CONFIG_FILE,
                               "; ".join(changed))
        atomic_write_text(config_file, OmegaConf.to_yaml(self.cfg))
        if self.metrics_path.exists():  # resumed: keep one consistent curve up to the checkpoint
            lines = [line for line in self.metrics_path.read_text().splitlines()
                     if line.strip() and json.loads(line)["step"] <= self.start_iteration]
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in lines))
        from .engine import UNTRAINED_MARKER
        load = self.cfg.args.load
        if self.resume is None and load and (base_checkpoint(load) / UNTRAINED_MARKER).exists():
            (self.run_dir / UNTRAINED_MARKER).write_text(
                f"Fine-tuned from the random-weight checkpoint {load} - NOT a trained model.\n")

    # -- SAT hooks -------------------------------------------------------------------------------
    def make_loaders(self, args, create_dataset_function, collate_fn=None):
        """Replaces SAT's make_loaders: SAT's loader samples with replacement and cannot resume the
        data position with one process (a plain BatchSampler has no ``start_iter``)."""
        sampler = StepBatchSampler(len(self.dataset), self.micro_batch, self.rank, self.world_size,
                                   self.cfg.args.seed, start_micro_batch=self.start_iteration * self.accumulation)
        workers = self.cfg.args.num_workers
        loader = DataLoader(EpochKeyed(self.dataset), batch_sampler=sampler, num_workers=workers,
                            pin_memory=self.device.type == "cuda", collate_fn=collate_fn,
                            prefetch_factor=2 if workers else None, persistent_workers=False)
        args.do_train, args.do_valid, args.do_test = True, False, False
        return loader, None, None

    def setup_model_and_optimizer(self, original):
        """Wraps SAT's setup (freeze, param groups, DeepSpeed engine) and restores a resumed run's
        DeepSpeed state (ZeRO optimizer partitions, fp32 master weights) and iteration."""
        def setup(args, model, config_params=None):
            engine, optimizer = original(args, model, config_params)
            self.engine = engine
            if self.resume is not None:
                # SAT's AnnealingLR reads each group's 'lr' as its scale: keep it across the load.
                scales = [group["lr"] for group in optimizer.param_groups]
                path, _ = engine.load_checkpoint(str(self.resume.folder), tag=DEEPSPEED_TAG,
                                                 load_module_strict=False, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
                if path is None:
                    raise CheckpointError(f"DeepSpeed state missing in {self.resume.folder / DEEPSPEED_TAG}")
                for group, scale in zip(optimizer.param_groups, scales):
                    group["lr"] = scale
                args.iteration = self.start_iteration
            if self.cfg.args.ema_decay > 0 and self.rank == 0:
                self.ema = EMA(self.module, self.cfg.args.ema_decay)
                if self.resume is not None:
                    ema_file = self.run_dir / f"{self.start_iteration}-ema" / MODEL_FILE
                    saved = load_state_dict(ema_file)
                    for name, tensor in self.ema.shadow.items():
                        tensor.copy_(saved[name])
            return engine, optimizer
        return setup

    def forward_step(self, data_iterator, model, args, timers):
        """SAT's forward hook: one micro-batch -> loss."""
        iteration = args.iteration
        micro = self._micro[1] + 1 if self._micro[0] == iteration else 0
        self._micro = (iteration, micro)
        start = time.perf_counter()
        batch = next(data_iterator)
        data_s = time.perf_counter() - start
        rng = StepRandom.for_step(self.cfg.args.seed, iteration, micro, self.rank, self.device)
        inputs = self.preparer(batch, rng)
        timing = self._step_timing
        if self.device.type == "cuda":  # peak of the frozen preprocessing (RAFT, VAE encodes, T5)
            timing["peak_prepare_gib"] = max(timing.get("peak_prepare_gib", 0.0), self._peak_gib())
        start = time.perf_counter()
        loss = model(inputs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timing["data_s"] = timing.get("data_s", 0.0) + data_s
        for key, value in self.preparer.timing.items():
            timing[key] = timing.get(key, 0.0) + value
        timing["dit_forward_s"] = timing.get("dit_forward_s", 0.0) + time.perf_counter() - start
        return loss, {}

    def train_step(self, original):
        """Wraps SAT's train_step: EMA update and one metrics.jsonl line per optimizer step."""
        def step(data_iterator, model, optimizer, lr_scheduler, args, timers, **kwargs):
            lr = optimizer.param_groups[0]["lr"]  # set by the scheduler for this step
            self._step_timing = {}
            before = {name: timers(name).elapsed(reset=False) for name in ("backward", "optimizer")}
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            start = time.perf_counter()
            loss, skipped, metrics = original(data_iterator, model, optimizer, lr_scheduler, args, timers, **kwargs)
            seconds = time.perf_counter() - start
            if self.ema is not None and not skipped:
                self.ema.update(self.module)
            if self.rank == 0:
                grad_norm = model.get_global_grad_norm()
                record = {"step": args.iteration + 1, "loss": float(loss), "lr": lr,
                          "grad_norm": None if grad_norm is None else float(grad_norm),
                          "seconds": round(seconds, 4),
                          "samples_per_second": round(self.micro_batch * self.accumulation * self.world_size / seconds, 4),
                          "skipped": int(skipped)}
                record.update({k: round(v, 4) for k, v in self._step_timing.items()})
                for name in ("backward", "optimizer"):
                    record[f"{name}_s"] = round(timers(name).elapsed(reset=False) - before[name], 4)
                if self.device.type == "cuda":
                    record["peak_step_gib"] = round(self._peak_gib(), 3)
                    record["reserved_gib"] = round(torch.cuda.max_memory_reserved(self.device) / 2**30, 3)
                with open(self.metrics_path, "a") as file:
                    file.write(json.dumps(record) + "\n")
            return loss, skipped, metrics
        return step

    def _peak_gib(self) -> float:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)

    def summary_writer(self, name, base="..", iteration=0):
        """TensorBoard in <run>/tensorboard when args.tensorboard (SAT: always, under summary_dir)."""
        if not self.cfg.args.tensorboard:
            return None
        from tensorboardX import SummaryWriter
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=iteration)

    def save_checkpoint(self, iteration, model, optimizer, lr_scheduler, args):
        """Replaces SAT's save: atomic (staging folder + renames, ``latest`` last), DiT-only model
        file in the SAT layout, DeepSpeed's optimizer files next to it, EMA, keep-last-N."""
        if iteration <= self.saved_iteration:  # SAT's final save right after an interval save
            return
        run = self.run_dir
        staging = run / f".incomplete-{iteration}"
        folder = staging / str(iteration)
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
            folder.mkdir(parents=True)
        _barrier()
        model.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, client_state={"iteration": iteration},
                              save_latest=False, exclude_frozen_parameters=True)
        if self.rank == 0:
            state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
            torch.save({"module": state, "iteration": iteration}, folder / MODEL_FILE)
            torch.save({"iteration": iteration, "world_size": self.world_size, "micro_batch": self.micro_batch,
                        "accumulation": self.accumulation, "seed": self.cfg.args.seed,
                        "consumed_micro_batches_per_rank": iteration * self.accumulation},
                       folder / TRAINING_STATE_FILE)
            if self.ema is not None:
                (staging / f"{iteration}-ema").mkdir()
                torch.save({"module": self.ema.state_dict(self.module), "iteration": iteration},
                           staging / f"{iteration}-ema" / MODEL_FILE)
        _barrier()
        if self.rank == 0:
            for name in sorted(os.listdir(staging), key=lambda n: n.isdigit()):  # -ema first
                target = run / name
                if target.exists():  # from a run that died between these renames and `latest`
                    shutil.rmtree(target)
                os.replace(staging / name, target)
            atomic_write_text(run / "latest", str(iteration))
            staging.rmdir()
            deleted = prune_checkpoints(run, self.cfg.args.keep_last_checkpoints)
            logger.info("saved checkpoint %s%s", run / str(iteration),
                        f" (deleted iterations {deleted})" if deleted else "")
        _barrier()
        self.saved_iteration = iteration

    def sat_replacements(self) -> dict:
        """Functions of ``sat.training.deepspeed_training`` replaced during ``training_main``."""
        from sat.training import deepspeed_training as dt
        return {
            "make_loaders": self.make_loaders,
            "setup_model_untrainable_params_and_optimizer":
                self.setup_model_and_optimizer(dt.setup_model_untrainable_params_and_optimizer),
            "get_learning_rate_scheduler": resumable_lr_scheduler(
                dt.get_learning_rate_scheduler, self.cfg.args.auto_warmup_steps, self.cfg.args.auto_warmup_rate),
            "train_step": self.train_step(dt.train_step),
            "save_checkpoint": self.save_checkpoint,
            "get_sample_writer": self.summary_writer,
            # SAT logs ~150 of its own arguments at the start; the run's config is training_config.yaml.
            "print_args": lambda args: None,
        }

    # -- run -------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train until ``args.train_iters``; returns the run folder."""
        from sat.training import deepspeed_training as dt
        if self.start_iteration >= self.cfg.args.train_iters:
            logger.info("%s already reached iteration %d (args.train_iters)", self.run_dir, self.start_iteration)
            return self.run_dir
        log_file = None
        loggers = [logging.getLogger()] + ([] if logging.getLogger("sat").propagate else [logging.getLogger("sat")])
        if self.rank == 0:  # everything logged (ours and SAT's) also goes to <run>/train.log
            log_file = logging.FileHandler(self.run_dir / "train.log")
            log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            for log in loggers:
                log.addHandler(log_file)
        try:
            logger.info("run folder %s", self.run_dir)
            self.module.to(self.device)
            with sat_compat.patch_module_attributes(dt, self.sat_replacements()):
                dt.training_main(self.args, model_cls=self.module, forward_step_function=self.forward_step,
                                 create_dataset_function=None)
        finally:
            if log_file is not None:
                for log in loggers:
                    log.removeHandler(log_file)
                log_file.close()
        return self.run_dir


def run_training(cfg: DictConfig, build: Callable[[DictConfig, torch.device, torch.dtype], Components] = build_components,
                 dataset=None) -> Path:
    """Fine-tune as configured (``sat/train_video.py``): returns the run folder.

    ``build(cfg, device, dtype)`` makes the components once torch.distributed is up (default: the
    real weights of the config); ``dataset`` replaces the SFT folders of ``args.train_data``.
    """
    trainer = Trainer(cfg)
    trainer.setup(build(trainer.cfg, trainer.device, trainer.dtype), dataset)
    return trainer.run()
