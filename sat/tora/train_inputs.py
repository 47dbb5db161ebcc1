"""What one training step consumes: per-step randomness, clips -> the DiT's inputs, the data order.

Per micro-batch of clips (everything here is frozen and runs without autograd)::

    clip [F, 3, H, W] --flow (RAFT or Farneback)--> flows --dense: all flows / sparse: tracked
        keypoints (blurred)--> motion flow --flow_to_rgb--> motion video --VAE--> motion latents
    clip --VAE--> x0 = 0.7 * posterior sample                               [B, T, 16, h, w]
    caption --T5--> context, zeroed per sample w.p. 0.1                     [B, L, 4096]
    I2V: noisy first frame --VAE--> image latent + zero frames, zeroed w.p. 0.05 (concat)

The sparse motion goes through ``trajectory.tracks_to_video``, the function that also turns the
point files of sampling into motion videos; ``trajectory.blur_border`` and
``trajectory.flow_image_chunk_frames`` select the official training numerics (zero border, colours
per 2 frames) or the sampling ones (reflect-101, all frames):
OFFICIAL_QUIRKS.md#blur-and-colour-mismatch.  Motion stage "none" passes no motion (a plain
text-to-video step).

Randomness: every draw of step k (keypoints, posterior samples, timesteps, noise, dropouts) comes
from generators seeded by (seed, k, micro-batch, data-parallel rank), and the global RNG is reseeded
the same way; clips come from epoch-wise shuffles seeded by (seed, epoch) (``StepBatchSampler``)
and each item is seeded by (seed, epoch, index) (``data.SFTDataset``).  So the RNG and data
position of a run are functions of the iteration: a resumed run replays the same steps.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

from .config import ConfigError
from .diffusion import gaussian_noise
from .dit import DiffusionTransformer
from .model_factory import load_base_weights
from .tracking import RAFT_MIN_SIZE, clip_flows, motion_video_from_clip, worker_flows  # noqa: F401 (re-exported)
from .vae import Posterior

logger = logging.getLogger(__name__)



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
