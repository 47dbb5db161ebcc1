"""The engine: DiT + VAE + text encoder + denoiser + sampler, and the sampling pipeline that ties them.

    prompt ──T5──────────────────────────────► context [1, L, D]            (uncond = zeros)
    point files ──trajectory──► motion video [1, 3, F, H, W] ──VAE──► motion latents [copies, T, 16, h, w]
    first frame (I2V) ──VAE──► image latent [1, 1, 16, h, w] + zero frames ──► concat [1, T, 16, h, w]
    noise [1, T, 16, h, w] ──sampler(DiT, CFG)──► latents ──VAE decode──► frames [F, H, W, 3] uint8

Latents are multiplied by ``scale_factor`` (0.7) after encoding and by its reciprocal before decoding.
Motion conditioning (extractor features, optionally every layer's gamma/beta) is prepared once per
video and reused by every denoising step.  All random draws go through one ``noise_fn(like)`` in a
fixed order (image encode, motion encode, initial noise, sampler), so a seed fixes the whole video.

Placement (``offload``): "none" keeps every component on the device; "model" (the official behaviour)
keeps components on the CPU (pinned) and moves each onto the device only for its stage, so the DiT
and the T5/VAE never share GPU memory; "sequential" also streams the DiT and T5 layer by layer.
Speed modes (compile, fp8, step cache, CFG parallel, attention kernel) come from ``cfg.acceleration``.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from . import acceleration
from .config import ConfigError
from .diffusion import (DiscreteDenoiser, NoiseFn, VPSDEDPMPP2MSampler, conditioned_network, gaussian_noise)
from .dit import DiffusionTransformer, use_compiled_kernels
# The model factory lives in model_factory.py (shared with training); these names stay importable here.
from .model_factory import ABOUT_FILE, UNTRAINED_MARKER, build_dit, randomize_  # noqa: F401
from .runtime import default_dtype, pick_device, rank_pairs
from .text import GeneralConditioner, build_conditioner
from .trajectory import draw_trajectories, load_motion_video
from .vae import VideoAutoencoder, load_vae

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Placement of components on the device
# ----------------------------------------------------------------------------------------------

class Offloaded:
    """Keeps a frozen module's tensors in (pinned) CPU memory and swaps them onto the device on demand.

    Moving back is free: the device copies are dropped and the CPU copies reattached, nothing is copied.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module, self.device = module, device
        pin = device.type == "cuda"
        self.host = {name: (t.data.cpu().pin_memory() if pin else t.data.cpu()) for name, t in self._tensors()}
        self._attach(self.host)

    def _tensors(self):
        yield from self.module.named_parameters()
        yield from self.module.named_buffers()

    def _attach(self, storage: dict) -> None:
        for name, tensor in self._tensors():
            tensor.data = storage[name]

    @contextlib.contextmanager
    def on_device(self):
        self._attach({name: t.to(self.device, non_blocking=True) for name, t in self.host.items()})
        try:
            yield self.module
        finally:
            self._attach(self.host)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


class Resident:
    """A module that stays on the device (offload "none")."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module = module.to(device)

    @contextlib.contextmanager
    def on_device(self):
        yield self.module


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------

@dataclass
class Generation:
    frames: np.ndarray  # [F, H, W, 3] uint8
    latents: torch.Tensor  # [1, T, 16, h, w] float32, scaled by scale_factor (sampler space)
    tracks: Optional[torch.Tensor] = None  # [N, F, 2] (x, y) video pixels per trajectory
    record: dict = field(default_factory=dict)  # intermediates when asked for

    def overlay(self) -> np.ndarray:
        """The frames with every trajectory drawn over them."""
        return self.frames if self.tracks is None else draw_trajectories(self.frames, self.tracks)


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------

class ToraEngine:
    def __init__(self, cfg: DictConfig, dit: DiffusionTransformer, vae: Optional[VideoAutoencoder],
                 conditioner: Optional[GeneralConditioner], device: torch.device, offload: str = "model"):
        if offload not in ("none", "model", "sequential"):
            raise ValueError(f"offload must be 'none', 'model' or 'sequential', got {offload!r}")
        self.cfg, self.device, self.offload = cfg, device, offload
        self.dtype = dit.dtype
        self.speed = cfg.acceleration
        self.last_step_cache = None  # the FirstBlockCache of the last video (its skip statistics)
        if self.speed.fp8:
            acceleration.use_fp8_matmuls(dit)
        use_compiled_kernels(self.speed.compile)
        self.cfg_group = rank_pairs() if self.speed.cfg_parallel else None
        place = Resident if offload == "none" or device.type == "cpu" else Offloaded
        if offload == "sequential" and device.type == "cuda":
            self.dit = acceleration.StreamedDiT(dit.eval(), device)
            # (not Resident: moving the whole conditioner would put every T5 block on the GPU)
            self.text = (acceleration.StreamedBlocks(conditioner.eval(), conditioner.embedder.transformer
                                                     .encoder.block, device) if conditioner is not None else None)
            self.vae = Resident(vae.eval(), device) if vae is not None else None
        else:
            self.dit = place(dit.eval(), device)
            self.vae = place(vae.eval(), device) if vae is not None else None
            self.text = place(conditioner.eval(), device) if conditioner is not None else None
        self.denoiser = DiscreteDenoiser.from_config(cfg.model.denoiser_config)
        self.sampler = VPSDEDPMPP2MSampler.from_config(cfg.model.sampler_config, self.denoiser)
        self.scale_factor = cfg.model.scale_factor
        p = cfg.model.network_config.params
        self.time_compression = p.time_compressed_rate
        self.max_latent_frames = (p.num_frames - 1) // p.time_compressed_rate + 1
        self.latent_size_hw = (p.latent_height, p.latent_width)
        self.video_size_hw = (p.latent_height * 8, p.latent_width * 8)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: DictConfig, load: Optional[str], device: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None, offload: str = "model", with_vae: bool = True,
                    with_text: bool = True) -> "ToraEngine":
        """Build every component; ``load`` is the DiT checkpoint (any SAT layout)."""
        device = pick_device(device)
        dtype = dtype or default_dtype(device)
        build_device = device if offload == "none" else torch.device("cpu")
        dit = build_dit(cfg, load, build_device, dtype)
        vae = load_vae(cfg.model.first_stage_config.params).to(dtype) if with_vae else None
        text = build_conditioner(cfg.model.conditioner_config, dtype=dtype) if with_text else None
        return cls(cfg, dit, vae, text, device, offload)

    # -- geometry --------------------------------------------------------------------------------
    def latent_frames_for(self, num_frames: int) -> int:
        if (num_frames - 1) % self.time_compression or num_frames < 1:
            raise ConfigError(f"num_frames must be 1 + {self.time_compression}k, got {num_frames}")
        latent = (num_frames - 1) // self.time_compression + 1
        if latent % 2 == 0:
            raise ConfigError(f"num_frames {num_frames} gives {latent} latent frames; the causal VAE decodes "
                              f"T latent frames to 1 + {self.time_compression}(T-1) frames only for odd T")
        if latent > self.max_latent_frames:
            raise ConfigError(f"num_frames {num_frames} exceeds the model's "
                              f"{(self.max_latent_frames - 1) * self.time_compression + 1}")
        return latent

    # -- stages ----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """T5 context [1, L, D] on the device."""
        with self.text.on_device() as text:
            return text([prompt]).to(self.device)

    def encode_video(self, video: torch.Tensor, noise_fn: NoiseFn) -> torch.Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] -> scaled posterior samples [B, T, 16, h, w] (sampler layout).

        One Gaussian draw shaped like the whole batch's latents (the official order)."""
        with self.vae.on_device() as vae:
            posterior = self._encode_within_memory(vae, video.to(self.device, self.dtype))
            latents = posterior.sample(eps=noise_fn(posterior.mean))
        return (self.scale_factor * latents).permute(0, 2, 1, 3, 4).float()

    def _encode_within_memory(self, vae: VideoAutoencoder, video: torch.Tensor):
        """The official one-pass encode of all frames needs ~40 GiB at 49x480x720; when the GPU has less,
        fall back to causal chunks (``encode_fallback_chunk_frames``; slightly different latents)."""
        try:
            return vae.encode(video)
        except torch.cuda.OutOfMemoryError:
            fallback = self.cfg.model.first_stage_config.params.encode_fallback_chunk_frames
            if not fallback or vae.params.encode_chunk_frames:
                raise
            torch.cuda.empty_cache()
            logger.warning("VAE encode of %d frames in one pass ran out of GPU memory; encoding in %d-frame "
                           "chunks instead (model.first_stage_config.params.encode_chunk_frames sets this)",
                           video.shape[2], fallback)
            return vae.encode(video, chunk_frames=fallback)

    def motion_latents(self, motion_video: torch.Tensor, noise_fn: NoiseFn) -> torch.Tensor:
        """Motion video [1, 3, F, H, W] -> latents [copies, T, 16, h, w] for the CFG batch.

        Official: one copy per CFG half (uncond first), each its own posterior sample;
        ``model.motion.separate_cfg_samples: false`` encodes a single copy shared by both halves.
        """
        copies = 2 if self.cfg.model.motion.separate_cfg_samples else 1
        return self.encode_video(motion_video.expand(copies, -1, -1, -1, -1), noise_fn)

    def image_latents(self, image: torch.Tensor, latent_frames: int, noise_fn: NoiseFn) -> torch.Tensor:
        """First frame [1, 3, H, W] in [-1, 1] -> [1, T, 16, h, w]: its latent, then zero frames."""
        first = self.encode_video(image[:, :, None], noise_fn)  # [1, 1, 16, h, w]
        padding = first.new_zeros(1, latent_frames - 1, *first.shape[2:])
        return torch.cat([first, padding], dim=1)

    def motion_cache_level(self, motion_batch: int, latent_frames: int) -> str:
        """Resolve ``model.motion.cache`` ("auto" picks gamma/beta caching when it fits the budget)."""
        level = self.cfg.model.motion.cache
        if level != "auto":
            return level
        p = self.cfg.model.network_config.params
        tokens = latent_frames * self.latent_size_hw[0] * self.latent_size_hw[1] // p.patch_size ** 2
        cache_bytes = 2 * p.num_layers * motion_batch * tokens * p.hidden_size * self.dtype.itemsize
        budget = self.cfg.model.motion.cache_budget_gib * 2**30
        if self.device.type == "cuda":  # leave room for the step's activations
            # free = the driver's free memory + what PyTorch's allocator holds but does not use
            free = (torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device)
                    - torch.cuda.memory_allocated(self.device))
            budget = min(budget, free - self.cfg.model.motion.activation_headroom_gib * 2**30)
        return "modulation" if cache_bytes <= budget else "features"

    def sample_latents(self, context: torch.Tensor, x_T: torch.Tensor, noise_fn: NoiseFn,
                       motion: Optional[torch.Tensor] = None, concat: Optional[torch.Tensor] = None,
                       progress: Optional[Callable[[int], None]] = None,
                       record: Optional[dict] = None) -> torch.Tensor:
        """Run the sampler from x_T [1, T, 16, h, w]; ``motion`` = motion latents [copies, T, 16, h, w]."""
        cond = {"crossattn": context}
        uncond = {"crossattn": GeneralConditioner.unconditional(context)}
        if concat is not None:
            cond["concat"] = uncond["concat"] = concat
        with self.dit.on_device() as dit, torch.no_grad(), acceleration.sdpa_backend(self.speed.sdpa_backend):
            network = conditioned_network(dit)
            if self.cfg_group is not None:  # this rank computes one CFG half: keep its motion copy
                group, half = self.cfg_group[0], self.cfg_group[1]
                network = acceleration.cfg_parallel(network, group, half)
                if motion is not None and motion.shape[0] == 2:
                    motion = motion[half:half + 1]
            kwargs = {}
            if motion is not None:
                level = self.motion_cache_level(motion.shape[0], x_T.shape[1])
                if level == "none":
                    kwargs["video_flow"] = motion.to(self.dtype)
                else:
                    kwargs["motion"] = dit.prepare_motion(motion, level)
            self.last_step_cache = cache = self.step_cache(dit)
            if cache is not None:
                kwargs["step_cache"] = cache
            samples = self.sampler(network, x_T, cond, uncond, noise_fn=noise_fn, callback=progress,
                                   record=record, **kwargs)
        return samples.float()

    def step_cache(self, dit: DiffusionTransformer):
        settings = self.speed.step_cache
        if not settings.enabled:
            return None
        return acceleration.FirstBlockCache(dit.params.num_layers, settings.threshold, settings.warmup_steps,
                                            settings.max_consecutive_skips)

    def decode(self, latents: torch.Tensor, spans: Optional[list] = None) -> torch.Tensor:
        """Sampler latents [1, T, 16, h, w] -> video [1, 3, F, H, W] in [-1, 1] (official chunked decode)."""
        z = latents.permute(0, 2, 1, 3, 4) * (1.0 / self.scale_factor)  # a multiplication, as officially
        with self.vae.on_device() as vae:
            return vae.decode(z.to(self.device, self.dtype), spans).float()

    # -- the whole pipeline ----------------------------------------------------------------------
    def generate(self, prompt: Optional[str] = None, trajectory_files: Sequence[str | Path] = (),
                 image: Optional[torch.Tensor] = None, seed: int = 0, num_frames: Optional[int] = None,
                 context: Optional[torch.Tensor] = None, noise_fn: Optional[NoiseFn] = None,
                 progress: Optional[Callable[[int], None]] = None, record: Optional[dict] = None,
                 decode_spans: Optional[list] = None,
                 stage: Optional[Callable[[str], None]] = None) -> Generation:
        """One video from ``prompt`` (or a precomputed T5 ``context`` [1, L, D]).

        ``image`` (I2V): first frame [1, 3, H, W] in [-1, 1] at the video size.  ``noise_fn`` overrides
        the seeded Gaussian source (used to replay recorded draws); ``record`` receives intermediates.
        ``progress(step)`` is called after every sampler step, ``stage(name)`` as "denoising" and
        "decoding" begin (progress bars).
        """
        stage = stage or (lambda _name: None)
        latent_frames = self.max_latent_frames if num_frames is None else self.latent_frames_for(num_frames)
        num_frames = (latent_frames - 1) * self.time_compression + 1
        if noise_fn is None:
            noise_fn = gaussian_noise(torch.Generator(self.device).manual_seed(seed))

        if context is None:
            context = self.encode_prompt(prompt)
        context = context.to(self.device)
        concat = None
        if image is not None:
            concat = self.image_latents(image, latent_frames, noise_fn)
            if record is not None:
                record["image_latent_padded"] = concat
        motion, tracks = None, None
        if trajectory_files:
            motion_video = load_motion_video(trajectory_files, num_frames, self.video_size_hw, self.cfg.trajectory)
            tracks = motion_video.tracks
            motion = self.motion_latents(motion_video.video, noise_fn)
            if record is not None:
                record.update(points=tracks, flow_image=motion_video.flow_image, video_flow_latent=motion)
        x_T = noise_fn(torch.empty(1, latent_frames, 16, *self.latent_size_hw, device=self.device))
        stage("denoising")
        latents = self.sample_latents(context, x_T, noise_fn, motion, concat, progress, record)
        stage("decoding")
        video = self.decode(latents, decode_spans)
        if record is not None:
            record["decoded"] = video
        frames = ((video[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)  # [F, H, W, 3] in [0, 1]
        frames = (frames * 255 + 0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
        return Generation(frames, latents, tracks, record if record is not None else {})
