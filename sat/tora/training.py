"""Fine-tuning Tora's motion modules: the training step and the loop around it (``train``).

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
per 2 frames) or the sampling ones (reflect-101, all frames); docs/OFFICIAL_QUIRKS.md.

The loop (:func:`train`, top to bottom): DeepSpeed engine (ZeRO-2, bf16 on GPU / fp32 on CPU,
torch AdamW on the official decay groups), then per step: the learning rate of the official
AnnealingLR schedule (:func:`learning_rate`), ``accumulation`` micro-batches of forward + backward,
DeepSpeed's step (average over ranks, clip to ``deepspeed.gradient_clipping``, AdamW), EMA, one
``metrics.jsonl`` line, a checkpoint every ``args.save_interval`` steps.  :class:`TrainState` is what
a checkpoint holds and resume restores; the run folder's layout: ``tora.run_folder``.

Randomness: every draw of step k (keypoints, posterior samples, timesteps, noise, dropouts) comes
from generators seeded by (seed, k, micro-batch, data-parallel rank), and the global RNG is reseeded
the same way; clips come from epoch-wise shuffles seeded by (seed, epoch) (``StepBatchSampler``)
and each item is seeded by (seed, epoch, index) (``data.SFTDataset``).  So the RNG and data
position of a run are functions of the iteration: a resumed run replays the same steps.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import run_folder, sat_compat
from .checkpoint import CheckpointError, load_dit_checkpoint, load_state_dict
from .config import ConfigError
from .diffusion import DiscreteDenoiser, VideoDiffusionLoss, conditioned_network, gaussian_noise
from .dit import DiffusionTransformer
# Model factory and base loading (shared with sampling); these names stay importable from here.
from .model_factory import (MOTION_MODULE_KEYS, UNTRAINED_MARKER, base_checkpoint,  # noqa: F401
                            expand_patch_embedding_, init_motion_modules_, load_base_weights)
from .run_folder import CONFIG_FILE, DEEPSPEED_TAG, METRICS_FILE, TRAINING_STATE_FILE
from .runtime import DTYPES, default_dtype, pick_device, seed_everything
from .tracking import dense_motion_flow, farneback_flows, raft_flows, track_keypoints
from .trajectory import flow_to_rgb, rgb_to_video, tracks_to_video

logger = logging.getLogger(__name__)

RAFT_MIN_SIZE = 128  # RAFT's correlation pyramid needs frames of at least 128 x 128 pixels
LR_DECAY_STYLES = ("linear", "cosine", "exponential", "constant", "None")  # SAT AnnealingLR's names


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
                           generator: torch.Generator) -> Tensor:
    """Training motion video [1, 3, F, H, W] in [-1, 1] (the VAE input) of a clip [F, 3, H, W].

    Stage "dense" (``motion_from_video.stage``): [zero flow, F-1 RAFT flows], no blur.  Stage
    "sparse": keypoints sampled on the first flow and tracked through the others
    (``tracking.track_keypoints``), then rasterised, blurred and coloured by
    ``trajectory.tracks_to_video`` - the function sampling uses for point files.  Colours are
    normalised per ``trajectory.flow_image_chunk_frames`` frames in both stages.
    """
    flows = clip_flows(raft, clip, motion_cfg)
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

    def _encode(self, video: Tensor, generator: torch.Generator) -> Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] -> 0.7 * posterior sample [B, T, 16, h, w] float32."""
        posterior = self.vae.encode(video.to(self.device))
        latents = posterior.sample(eps=gaussian_noise(generator)(posterior.mean))
        return (self.scale_factor * latents).permute(0, 2, 1, 3, 4).float()

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
        motion_latents = None  # stage "none": a plain text-to-video step
        if self.cfg.motion_from_video.stage != "none":
            motion = torch.cat([motion_video_from_clip(clip, self.raft, self.cfg.motion_from_video,
                                                       self.cfg.trajectory, rng.cpu) for clip in clips])
            start = self._time("motion_s", start)
            motion_latents = self._encode(motion, rng.device)
        video = clips.permute(0, 2, 1, 3, 4)  # [B, 3, F, H, W]
        x0 = self._encode(video, rng.device)
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
    micro-batch.  :meth:`disable_untrainable_params` runs before the optimizer is built.
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

def build_components(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> Components:
    """The real components: the DiT with the weights of ``args.load``, VAE, T5, RAFT."""
    from .model_factory import build_dit
    from .text import build_conditioner
    from .tracking import load_raft
    from .vae import load_vae
    dit = build_dit(cfg, None, device, dtype, seed=cfg.args.seed)
    if cfg.args.load and not cfg.args.resume:  # resumed runs load their own checkpoint (build_state)
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
                          "(ZeRO-3 partitions the SAT model's construction; use 2, the official value)")
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
        fail("seed", "must be >= 1 (the official SAT code asserts a positive seed)")
    if not a.train_data:
        fail("train_data", "name at least one data folder")
    if a.save_interval < 1 or a.log_interval < 1:
        fail("save_interval" if a.save_interval < 1 else "log_interval", "must be >= 1")
    if a.keep_last_checkpoints < 0:
        fail("keep_last_checkpoints", "must be >= 0 (0 keeps all)")
    if not 0.0 <= a.ema_decay < 1.0:
        fail("ema_decay", "must be in [0, 1) (0 = no EMA)")
    if a.auto_warmup_steps > 0 and a.warmup <= 0:
        fail("warmup", "must be > 0 while args.auto_warmup_steps > 0 (the schedule divides by it)")
    if a.lr_decay_style not in LR_DECAY_STYLES:
        fail("lr_decay_style", f"choose one of {list(LR_DECAY_STYLES)}")
    if not 0.0 <= a.warmup <= 1.0:
        fail("warmup", "must be in [0, 1] (a fraction of the decay length)")
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
# Optimizer groups and learning rate (the official SAT rules, written out)
# ----------------------------------------------------------------------------------------------

def no_decay_module_types() -> tuple[type, ...]:
    """Norm layers whose parameters get no weight decay (SAT's ``NO_WD_MODULES``)."""
    from sat.ops.layernorm import LayerNorm, RMSNorm
    return (LayerNorm, nn.LayerNorm, RMSNorm)


def decay_groups(module: nn.Module) -> list[dict]:
    """The trainable parameters in the official two AdamW groups: weights with the configured
    weight decay, then biases and the parameters of LayerNorm/RMSNorm layers with none.  Other norms
    (GroupNorm, BatchNorm) are decayed, as in SAT; a parameter flagged ``no_weight_decay`` is not."""
    norms = no_decay_module_types()
    decay, no_decay = [], []
    for layer in module.modules():
        for name, param in layer._parameters.items():
            if param is None or not param.requires_grad:
                continue
            exempt = isinstance(layer, norms) or name == "bias" or getattr(param, "no_weight_decay", False)
            (no_decay if exempt else decay).append(param)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def learning_rate(step: int, base_lr: float, args) -> float:
    """The learning rate of optimizer step ``step`` (1-based), SAT's AnnealingLR in finetune mode.

    With L = base_lr, T = lr_decay_iters or train_iters, W = warmup * T:
    steps 1..auto_warmup_steps use min(auto_warmup_rate L, L n / W); then L n / W up to W; then
    linear: L (T - (n - W)) / T, cosine: from L down to lr_decay_ratio L, else L.
    """
    total = max(1, args.lr_decay_iters if args.lr_decay_iters is not None else args.train_iters)
    warmup = args.warmup * total
    if step <= args.auto_warmup_steps:
        return min(float(base_lr) * args.auto_warmup_rate, float(base_lr) * step / warmup)
    if warmup > 0 and step <= warmup:
        return float(base_lr) * step / warmup
    if args.lr_decay_style == "linear":
        return base_lr * ((total - (step - warmup)) / total)
    if args.lr_decay_style == "cosine":
        ratio = 1 / args.lr_decay_ratio
        progress = min(1.0, (step - warmup) / total)
        return base_lr / ratio * ((math.cos(math.pi * progress) + 1) * (ratio - 1) / 2 + 1)
    return base_lr  # exponential (SAT: constant as well), constant, None


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------

def start_processes(device: torch.device, ds_config: dict, cfg: DictConfig) -> tuple[int, int]:
    """torch.distributed (NCCL on GPU, gloo on CPU) + DeepSpeed's communication + SAT's
    model-parallel state (size 1) and activation checkpointing; returns (rank, world size)."""
    sat_compat.prepare_process()
    sat_compat.quiet_logs()
    import deepspeed
    from .runtime import init_distributed
    if device.type == "cuda":
        torch.cuda.set_device(device)
        sat_compat.cuda_flags_as_sat()
    # Creates the process group, or adopts one that exists (a model built earlier in this process).
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)
    init_distributed()  # SAT's model-parallel state, which the DiT's SAT layers read
    sat_compat.configure_activation_checkpointing(ds_config, cfg.model.network_config.params.num_layers,
                                                  cfg.args.seed)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _broadcast(value):
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]
    return value


def _mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of a scalar over all ranks (what the log shows: the loss of the global batch)."""
    value = value.detach().clone().float()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return value


def _all_ranks_ok(ok: bool, device: torch.device) -> bool:
    """True when ``ok`` on every rank (so that no rank waits in a barrier for a failed one)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return ok
    flag = torch.tensor([1 if ok else 0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


# ----------------------------------------------------------------------------------------------
# The state a checkpoint holds
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """What a checkpoint holds and resume restores.  The data position and every random draw are
    functions of ``iteration`` (see the module docstring), so nothing else is needed to continue."""
    iteration: int  # optimizer steps done
    engine: object  # the DeepSpeed engine: trainable weights, fp32 masters, ZeRO optimizer partitions
    module: "ToraTrainingModule"
    ema: Optional["EMA"]  # rank 0 only
    # The run's shape: ZeRO partitions and the data order depend on it, so resume must match it.
    world_size: int
    micro_batch: int
    accumulation: int
    seed: int

    def shape(self) -> dict:
        return {"world_size": self.world_size, "micro_batch": self.micro_batch, "accumulation": self.accumulation}

    def record(self) -> dict:
        """``training_state.pt``."""
        return {"iteration": self.iteration, **self.shape(), "seed": self.seed,
                "consumed_micro_batches_per_rank": self.iteration * self.accumulation}


def save_checkpoint(state: TrainState, run_dir: Path, keep: int, rank: int, device: torch.device) -> None:
    """Checkpoint ``state.iteration``: stage every file, fsync, rename, then ``latest`` (run_folder).

    A failed write (a full disk) removes the staging folder and raises CheckpointError on every
    rank; the previous checkpoint and ``latest`` stay as they were.
    """
    iteration = state.iteration
    staging = run_folder.staging_dir(run_dir, iteration)
    folder = staging / str(iteration)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        folder.mkdir(parents=True)
    _barrier()
    error = None
    try:
        state.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, client_state={"iteration": iteration},
                                     save_latest=False, exclude_frozen_parameters=True)
        if rank == 0:
            _write_model_files(state, staging)
    except (OSError, RuntimeError) as err:
        error = err if isinstance(err, CheckpointError) else run_folder.write_error(err, folder)
    if not _all_ranks_ok(error is None, device):
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        _barrier()
        raise error or CheckpointError(f"saving checkpoint {iteration} failed on another rank (see its log)")
    if rank == 0:
        deleted = run_folder.commit_checkpoint(run_dir, iteration, keep)
        logger.info("saved checkpoint %s%s", run_dir / str(iteration),
                    f" (deleted iterations {deleted})" if deleted else "")
    _barrier()


def _write_model_files(state: TrainState, staging: Path) -> None:
    """Rank 0: the whole DiT in SAT's layout, training_state.pt, and the EMA twin."""
    iteration = state.iteration
    module_state = {k: v.detach().cpu() for k, v in state.module.state_dict().items()}
    run_folder.write_durably(staging / str(iteration) / run_folder.MODEL_FILE,
                             lambda f: torch.save({"module": module_state, "iteration": iteration}, f))
    run_folder.write_durably(staging / str(iteration) / TRAINING_STATE_FILE,
                             lambda f: torch.save(state.record(), f))
    if state.ema is not None:
        (staging / f"{iteration}-ema").mkdir()
        ema_state = state.ema.state_dict(state.module)
        run_folder.write_durably(staging / f"{iteration}-ema" / run_folder.MODEL_FILE,
                                 lambda f: torch.save({"module": ema_state, "iteration": iteration}, f))


def resume_point(run_dir: Path, shape: dict) -> tuple[int, Path]:
    """(iteration, folder) of the run's ``latest`` checkpoint, after checking its files and that
    it was trained with the same world size, micro-batch and accumulation."""
    iteration = run_folder.latest_iteration(run_dir)
    if iteration is None:
        raise CheckpointError(f"cannot resume from {run_dir}: no 'latest' file (not a run folder "
                              "of train_video.py, or no checkpoint was completed)")
    folder = run_dir / str(iteration)
    if not folder.is_dir():
        raise CheckpointError(f"{run_dir / run_folder.LATEST} names iteration {iteration}, but {folder} "
                              "does not exist")
    ema = run_dir / f"{iteration}-ema"
    run_folder.check_checkpoint_files([folder] + ([ema] if ema.is_dir() else []))
    saved = run_folder.read_training_state(folder / TRAINING_STATE_FILE)
    for key, value in shape.items():
        if saved.get(key) != value:
            raise CheckpointError(
                f"cannot resume {run_dir} at iteration {iteration}: it was trained with {key} "
                f"{saved.get(key)}, this run has {value} (the ZeRO optimizer partitions and the data "
                f"order depend on it).  To continue from its weights with a fresh optimizer, start a "
                f"new run with --load {run_dir}")
    return iteration, folder


def restore(state: TrainState, run_dir: Path, folder: Path) -> None:
    """DeepSpeed's optimizer partitions and fp32 master weights, and the EMA, of a checkpoint."""
    path, _ = state.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_module_strict=False,
                                           load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed state missing in {folder / DEEPSPEED_TAG}")
    if state.ema is None:
        return
    ema_file = run_folder.model_file(run_dir, state.iteration, ema=True)
    if not ema_file.is_file():
        logger.warning("%s is missing (the run had no EMA): the EMA starts from the current weights", ema_file)
        return
    saved = load_state_dict(ema_file)
    for name, tensor in state.ema.shadow.items():
        tensor.copy_(saved[name])


# ----------------------------------------------------------------------------------------------
# Per-step records
# ----------------------------------------------------------------------------------------------

class StepClock:
    """Seconds per phase of one step (GPU work synchronised first) and peak memory."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.start = self.mark = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.mark
        self.mark = now

    def add(self, timing: dict) -> None:
        for name, value in timing.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + value

    def peak_gib(self) -> float:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)

    def record(self, samples: int) -> dict:
        total = time.perf_counter() - self.start
        record = {"seconds": round(total, 4), "samples_per_second": round(samples / total, 4)}
        record.update({k: round(v, 4) for k, v in self.seconds.items()})
        if self.device.type == "cuda":
            record["peak_step_gib"] = self.peak_gib()
            record["reserved_gib"] = round(torch.cuda.max_memory_reserved(self.device) / 2**30, 3)
        return record


class RunLog:
    """Rank 0's outputs per step: metrics.jsonl, TensorBoard, the progress bar, a log line every
    ``log_interval`` steps (averaged)."""

    def __init__(self, run_dir: Path, cfg: DictConfig, start: int, enabled: bool):
        self.enabled, self.interval, self.total = enabled, cfg.args.log_interval, cfg.args.train_iters
        self.metrics_path = run_dir / METRICS_FILE
        self.losses: list[float] = []
        self.writer = self.bar = None
        if not enabled:
            return
        if cfg.args.tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start)
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm
        self.bar = tqdm(total=self.total, initial=start, unit="step", desc="training", dynamic_ncols=True)
        self.redirect = logging_redirect_tqdm()  # log lines above the bar, not through it
        self.redirect.__enter__()

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as file:
            file.write(f"{json.dumps(record)}\n")
        step = record["step"]
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "seconds"):
                if record.get(key) is not None:
                    self.writer.add_scalar(f"Train/{key}", record[key], step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        self.losses.append(record["loss"])
        if step % self.interval == 0 or step == self.total:
            logger.info("step %d/%d: loss %.6f (mean of %d), lr %.3e, %.2f s/step", step, self.total,
                        sum(self.losses) / len(self.losses), len(self.losses), record["lr"], record["seconds"])
            self.losses = []

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.redirect.__exit__(None, None, None)
            self.bar.close()


@contextlib.contextmanager
def log_to_file(path: Optional[Path]):
    """Everything logged (ours, SAT's, DeepSpeed's) also goes to ``path`` (train.log) on rank 0."""
    if path is None:
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in sat_compat.THIRD_PARTY_LOGGERS
                                       if not logging.getLogger(n).propagate]
    project = logging.getLogger(__name__.partition(".")[0])  # "tora": its INFO lines belong in the file
    level = project.level
    if project.getEffectiveLevel() > logging.INFO:
        project.setLevel(logging.INFO)
    for log in loggers:
        log.addHandler(handler)
    try:
        yield
    finally:
        for log in loggers:
            log.removeHandler(handler)
        handler.close()
        project.setLevel(level)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def prepare_config(cfg: DictConfig) -> DictConfig:
    """Checked copy of the config; ``args.checkpoint_activations`` (the official key) switches the
    DiT's activation checkpointing."""
    check_training_config(cfg)
    cfg = copy.deepcopy(cfg)
    cfg.model.network_config.params.transformer_args.checkpoint_activations = cfg.args.checkpoint_activations
    return cfg


def open_run_dir(cfg: DictConfig, rank: int) -> tuple[Path, bool]:
    """(run folder, created now): ``args.resume``, or a new unique folder made by rank 0."""
    if cfg.args.resume:
        run_dir = Path(cfg.args.resume)
        if not (run_dir / run_folder.LATEST).is_file():
            raise CheckpointError(f"cannot resume from {run_dir}: no 'latest' file (not a run folder "
                                  "of train_video.py, or no checkpoint was completed)")
        return run_dir, False
    created = run_folder.create_run_dir(cfg.args.save, cfg.args.experiment_name) if rank == 0 else None
    return Path(_broadcast(str(created) if created else None)), True


def write_run_files(cfg: DictConfig, run_dir: Path, start: int, resumed: bool) -> None:
    """Rank 0: training_config.yaml (a resumed run warns about changed settings), metrics.jsonl cut
    back to the checkpoint, the UNTRAINED marker of a run from random weights."""
    config_file = run_dir / CONFIG_FILE
    if resumed and config_file.is_file():
        changed = config_changes(OmegaConf.load(config_file), cfg)
        if changed:
            logger.warning("resuming with settings that differ from the run's %s: %s", CONFIG_FILE,
                           "; ".join(changed))
    run_folder.write_text_durably(config_file, OmegaConf.to_yaml(cfg))
    run_folder.truncate_metrics(run_dir / METRICS_FILE, start)
    load = cfg.args.load
    if not resumed and load and (base_checkpoint(load) / UNTRAINED_MARKER).exists():
        (run_dir / UNTRAINED_MARKER).write_text(
            f"Fine-tuned from the random-weight checkpoint {load} - NOT a trained model.\n")


def data_loader(dataset, cfg: DictConfig, rank: int, world_size: int, micro_batch: int,
                start_micro_batch: int, device: torch.device) -> Iterator[dict]:
    """Endless micro-batches of this rank from micro-batch ``start_micro_batch`` on."""
    sampler = StepBatchSampler(len(dataset), micro_batch, rank, world_size, cfg.args.seed,
                               start_micro_batch=start_micro_batch)
    workers = cfg.args.num_workers
    return iter(DataLoader(EpochKeyed(dataset), batch_sampler=sampler, num_workers=workers,
                           pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None,
                           persistent_workers=False))


@dataclass
class Run:
    """Where a run happens: its processes, folder and fixed settings (nothing here changes per step)."""
    cfg: DictConfig
    device: torch.device
    dtype: torch.dtype
    ds_config: dict
    rank: int
    world_size: int
    run_dir: Path
    created: bool  # the folder was made by this run (removed again if the start fails)

    @property
    def micro_batch(self) -> int:
        return self.ds_config["train_micro_batch_size_per_gpu"]

    @property
    def accumulation(self) -> int:
        return self.ds_config["gradient_accumulation_steps"]

    @property
    def base_lr(self) -> float:
        return self.ds_config["optimizer"]["params"]["lr"]


def start_run(cfg: DictConfig) -> Run:
    """Checked config, device and dtype, DeepSpeed config, processes, run folder."""
    cfg = prepare_config(cfg)
    device = pick_device(cfg.args.device) if cfg.args.device else pick_device(None)
    dtype = training_dtype(cfg, device)
    ds_config = deepspeed_config(cfg, dtype)
    rank, world_size = start_processes(device, ds_config, cfg)
    seed_everything(cfg.args.seed)
    run_dir, created = open_run_dir(cfg, rank)
    return Run(cfg, device, dtype, ds_config, rank, world_size, run_dir, created)


def build_state(run: Run, build: Callable, start: int, folder: Optional[Path]) -> tuple[TrainState, BatchPreparer]:
    """Components, the loss module, the DeepSpeed engine on the official decay groups, and the
    state of checkpoint ``folder`` when resuming."""
    cfg, rank, device = run.cfg, run.rank, run.device
    components = build(cfg, device, run.dtype)
    if folder is not None:
        load_dit_checkpoint(components.dit, folder)  # the whole DiT; DeepSpeed's state follows
    denoiser = DiscreteDenoiser.from_config(cfg.model.denoiser_config)
    loss_fn = VideoDiffusionLoss.from_config(cfg.model.loss_fn_config, denoiser, rank, run.world_size)
    module = ToraTrainingModule(components.dit, loss_fn, cfg.model.trainable_modules)
    module.disable_untrainable_params()
    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=module.to(device), model_parameters=decay_groups(module),
                                           config=run.ds_config, dist_init_required=False)
    ema = EMA(module, cfg.args.ema_decay) if cfg.args.ema_decay > 0 and rank == 0 else None
    state = TrainState(start, engine, module, ema, run.world_size, run.micro_batch, run.accumulation, cfg.args.seed)
    if folder is not None:
        restore(state, run.run_dir, folder)
    return state, BatchPreparer(cfg, components, device)


def train(cfg: DictConfig, build: Callable[[DictConfig, torch.device, torch.dtype], Components] = build_components,
          dataset=None) -> Path:
    """Fine-tune as configured (``sat/train_video.py``) until ``args.train_iters``; returns the run folder.

    ``build(cfg, device, dtype)`` makes the components once torch.distributed is up (default
    :func:`build_components`: the real weights of the config); ``dataset`` replaces the SFT folders
    of ``args.train_data``.
    """
    run = start_run(cfg)
    cfg, args, rank, run_dir = run.cfg, run.cfg.args, run.rank, run.run_dir
    shape = {"world_size": run.world_size, "micro_batch": run.micro_batch, "accumulation": run.accumulation}
    with _remove_on_failed_start(run_dir, run.created, rank) as started, \
            log_to_file(run_dir / "train.log" if rank == 0 else None):
        start, folder = resume_point(run_dir, shape) if args.resume else (0, None)
        if start >= args.train_iters:
            logger.info("%s already reached iteration %d (args.train_iters)", run_dir, start)
            return run_dir
        logger.info("run folder %s%s", run_dir, f", resuming at iteration {start}" if folder else "")
        state, preparer = build_state(run, build, start, folder)
        if dataset is None:
            from .data import SFTDataset
            dataset = SFTDataset(list(args.train_data), cfg.data.params, seed=args.seed)
        batches = data_loader(dataset, cfg, rank, run.world_size, run.micro_batch, start * run.accumulation,
                              run.device)
        if rank == 0:
            write_run_files(cfg, run_dir, start, resumed=folder is not None)
        _barrier()
        started()
        log = RunLog(run_dir, cfg, start, enabled=rank == 0)
        state.engine.train()
        try:
            while state.iteration < args.train_iters:
                lr = learning_rate(state.iteration + 1, run.base_lr, args)
                record = train_step(state, run, batches, preparer, lr)
                log.step(record)
                exiting = bool(args.exit_interval) and state.iteration % args.exit_interval == 0
                finished = state.iteration >= args.train_iters
                if state.iteration % args.save_interval == 0 or (finished and not exiting):
                    save_checkpoint(state, run_dir, args.keep_last_checkpoints, rank, run.device)
                if exiting:  # args.exit_interval: stop here (SAT: no final save)
                    break
        finally:
            log.close()
    return run_dir


def train_step(state: TrainState, run: Run, batches: Iterator[dict], preparer: BatchPreparer, lr: float) -> dict:
    """One optimizer step of ``accumulation`` micro-batches; advances ``state``; returns its
    metrics.jsonl record."""
    step, engine, device = state.iteration, state.engine, run.device  # step: 0-based (RNG, data)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    clock = StepClock(device)
    losses, skipped = [], 0
    for micro in range(state.accumulation):
        batch = next(batches)
        clock.lap("data_s")
        inputs = preparer(batch, StepRandom.for_step(state.seed, step, micro, run.rank, device))
        clock.add(preparer.timing)
        if device.type == "cuda":  # peak of the frozen preprocessing (RAFT, VAE, T5)
            clock.seconds["peak_prepare_gib"] = max(clock.seconds.get("peak_prepare_gib", 0.0), clock.peak_gib())
        clock.mark = time.perf_counter()
        loss = engine(inputs)
        clock.lap("dit_forward_s")
        mean_loss = _mean_over_ranks(loss)
        if not torch.isfinite(mean_loss):  # the same on every rank: all skip together
            skipped += 1
            logger.warning("step %d, micro-batch %d: loss %s, no gradient from it", step + 1, micro, float(mean_loss))
            if state.accumulation == 1:
                break  # no backward, no optimizer step (SAT's rule)
            loss = zero_gradient_loss(state.module)  # keeps DeepSpeed's accumulation in step
        else:
            losses.append(float(mean_loss))
        engine.backward(loss)
        clock.lap("backward_s")
        engine.step()  # at the accumulation boundary: average over ranks, clip, AdamW
        clock.lap("optimizer_s")
    state.iteration += 1
    updated = skipped < state.accumulation
    if state.ema is not None and updated:
        state.ema.update(state.module)
    grad_norm = engine.get_global_grad_norm() if updated else None
    return {"step": state.iteration, "loss": sum(losses) / len(losses) if losses else float("nan"), "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            **clock.record(state.micro_batch * state.accumulation * run.world_size), "skipped": skipped}


def zero_gradient_loss(module: nn.Module) -> Tensor:
    """A loss whose gradient is exactly zero for every trainable parameter: the backward of a
    micro-batch with a non-finite loss while accumulating (DeepSpeed counts micro-batches; a step
    whose micro-batches are all non-finite then applies zero gradients)."""
    return sum((p.sum() * 0.0 for p in module.parameters() if p.requires_grad), torch.zeros(()))


@contextlib.contextmanager
def _remove_on_failed_start(run_dir: Path, created: bool, rank: int):
    """A run folder created by this run is deleted again when the run fails before its first step;
    the body calls the yielded function once the loop is about to start."""
    started = [False]
    try:
        yield lambda: started.__setitem__(0, True)
    except BaseException:
        if created and not started[0] and rank == 0:
            run_folder.remove_unused_run_dir(run_dir)
        raise


run_training = train  # the name callers (scripts, tests) use
