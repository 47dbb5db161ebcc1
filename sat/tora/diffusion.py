"""Diffusion math of Tora (CogVideoX-5B): schedule, denoiser, guidance, sampler, training loss.

The official code calls the quantity it schedules "sigma", but it is the *signal scale*

    a_t = sqrt(alpha_cumprod_t)              1 = clean, 0 = pure noise (zero terminal SNR)
    x_t = a_t x_0 + sqrt(1 - a_t^2) eps      the noised latent of DDPM timestep t in 0..999

and the network predicts v = a_t eps - sqrt(1 - a_t^2) x_0, so the x_0 estimate ("denoised") is

    D(x_t) = a_t x_t - sqrt(1 - a_t^2) v_hat(x_t, t).

Pieces, each built from its config section (``from_config``):

* :class:`ZeroSNRDDPMDiscretization` - a_t for a subset of timesteps, zero-SNR rescaled over that subset.
* :class:`DiscreteDenoiser` - D(x_t) with the VideoScaling (v-prediction) coefficients.
* :class:`DynamicCFG` / :class:`VanillaCFG` - classifier-free guidance on D, batch order [uncond; cond].
* :class:`VPSDEDPMPP2MSampler` - DPM-Solver++(2M) SDE in the a-parameterisation.
* :class:`DiscreteSampling` + :class:`VideoDiffusionLoss` - the training objective.

The network is any callable ``model(x [N, T, C, H, W], c_noise [N], cond, **model_kwargs) -> v_hat``
where ``cond`` is a dict with ``"crossattn"`` (text context [N, L, D]) and optionally ``"concat"``
(I2V image latents, concatenated on the channel axis by the network); :func:`conditioned_network`
adapts the DiT.  Extra keyword arguments (the motion latents ``video_flow``, already holding one copy
per CFG half) are passed through unchanged.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from .config import ConfigError

Network = Callable[..., Tensor]  # model(x, c_noise, cond, **model_kwargs) -> v-prediction
NoiseFn = Callable[[Tensor], Tensor]  # noise_fn(like) -> standard normal tensor shaped like `like`


def conditioned_network(net: torch.nn.Module) -> Network:
    """Adapt ``net(x, timesteps, context, concat=None, **kw)`` (the DiT's signature) to :data:`Network`.

    Official ``OpenAIWrapper``: ``cond["crossattn"]`` is the context, ``cond["concat"]`` (optional)
    goes onto the channel axis of x.
    """
    def call(x: Tensor, c_noise: Tensor, cond: dict, **model_kwargs) -> Tensor:
        unknown = set(cond) - {"crossattn", "concat"}
        if unknown:
            raise ValueError(f"unknown conditioning keys {sorted(unknown)}; expected 'crossattn' "
                             "and optionally 'concat'")
        return net(x, c_noise, cond["crossattn"], concat=cond.get("concat"), **model_kwargs)
    return call


def _randn(shape, generator: Optional[torch.Generator], dtype: torch.dtype, device) -> Tensor:
    """N(0, 1) drawn on ``device`` (the generator's device when one is given), returned on ``device``."""
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=dtype, device=draw_device).to(device)


def gaussian_noise(generator: Optional[torch.Generator] = None) -> NoiseFn:
    """Default noise source: ``randn_like`` (same stream as the official code), optionally seeded."""
    return lambda like: _randn(like.shape, generator, like.dtype, like.device)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, ...] broadcastable against ``like``."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------

class ZeroSNRDDPMDiscretization:
    """Scaled-linear DDPM betas, an optional SNR shift, and the zero-terminal-SNR rescale.

        beta_i        = (sqrt(linear_start) + i / (N-1) * (sqrt(linear_end) - sqrt(linear_start)))^2
        alpha_cumprod = cumprod(1 - beta) / (s + (1 - s) * cumprod(1 - beta))      (s = shift_scale)

    ``self(n)`` picks n roughly equally spaced timesteps, takes a = sqrt(alpha_cumprod) (float32) and
    rescales *over that subset* so that its noisiest value is exactly 0 and its cleanest unchanged
    (official; the sampler's 50-step values therefore differ slightly from the 1000-entry table).
    """

    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.012,
                 num_timesteps: int = 1000, shift_scale: float = 1.0):
        self.num_timesteps = num_timesteps
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps,
                               dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # SNR shift (CogVideoX): SNR / s; s = 1 is the identity.
        self.alphas_cumprod = alphas_cumprod / (shift_scale + (1 - shift_scale) * alphas_cumprod)  # [N] f64

    @classmethod
    def from_config(cls, cfg, key: str = "model.sampler_config.params.discretization_config"):
        p = cfg.params
        if not 0 < p.linear_start < p.linear_end < 1:
            raise ConfigError(f"'{key}.params': need 0 < linear_start < linear_end < 1, got "
                              f"{p.linear_start}, {p.linear_end}")
        if p.num_timesteps < 2:
            raise ConfigError(f"'{key}.params.num_timesteps' must be >= 2, got {p.num_timesteps}")
        if p.shift_scale <= 0:
            raise ConfigError(f"'{key}.params.shift_scale' must be > 0, got {p.shift_scale}")
        return cls(p.linear_start, p.linear_end, p.num_timesteps, p.shift_scale)

    def timesteps(self, n: int) -> Tensor:
        """[n] int64 DDPM timesteps, ascending: int(linspace(N-1, 0, n, endpoint=False)) reversed."""
        if not 2 <= n <= self.num_timesteps:
            raise ValueError(f"need 2 <= number of timesteps <= {self.num_timesteps}, got {n}")
        steps = np.linspace(self.num_timesteps - 1, 0, n, endpoint=False).astype(np.int64)[::-1]
        return torch.from_numpy(steps.copy())

    def __call__(self, n: int) -> tuple[Tensor, Tensor]:
        """(alphas_cumprod_sqrt [n] float32, timesteps [n] int64), both in ascending timestep order."""
        timesteps = self.timesteps(n)
        a = self.alphas_cumprod[timesteps].float().sqrt()
        a_clean, a_noisy = a[0], a[-1]  # ends of the *selected* subset
        return (a - a_noisy) * (a_clean / (a_clean - a_noisy)), timesteps

    def table(self) -> Tensor:
        """[N] float32 a values of all timesteps; index = DDPM timestep (a[N-1] = 0)."""
        return self(self.num_timesteps)[0]


# ----------------------------------------------------------------------------------------------
# Denoiser
# ----------------------------------------------------------------------------------------------

def video_scaling(alphas_cumprod_sqrt: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """VideoScaling (v-prediction): D = c_skip x + c_out v_hat(c_in x, c_noise).

    c_skip = a, c_out = -sqrt(1 - a^2), c_in = 1, c_noise = the timestep index as passed.
    """
    a = alphas_cumprod_sqrt
    return a, -((1 - a ** 2) ** 0.5), torch.ones_like(a), idx


class DiscreteDenoiser:
    """x_0 estimate D(x_t) from the v-prediction, with the signal scale snapped to a table of
    ``num_idx`` (officially 1000) entries.

    The incoming a is replaced by the nearest table entry (official ``DiscreteDenoiser``; for the
    cleanest sampler steps that is the entry of timestep t-1, because the sampler's subset is
    rescaled differently).  c_noise is the ``idx`` passed in, not derived from a.
    """

    def __init__(self, discretization: ZeroSNRDDPMDiscretization, num_idx: int = 1000):
        self.num_idx = num_idx
        self.alphas_cumprod_sqrt = discretization(num_idx)[0]  # [num_idx] float32, index = timestep

    @classmethod
    def from_config(cls, cfg, key: str = "model.denoiser_config"):
        p = cfg.params
        if p.quantize_c_noise:
            raise ConfigError(f"'{key}.params.quantize_c_noise' = true is not supported: with "
                              "VideoScaling c_noise already is the integer timestep (official value: false)")
        disc = ZeroSNRDDPMDiscretization.from_config(p.discretization_config,
                                                     f"{key}.params.discretization_config")
        if not 2 <= p.num_idx <= disc.num_timesteps:
            raise ConfigError(f"'{key}.params.num_idx' = {p.num_idx} must be in 2..{disc.num_timesteps} "
                              "(discretization num_timesteps)")
        return cls(disc, p.num_idx)

    def sigma_to_idx(self, alphas_cumprod_sqrt: Tensor) -> Tensor:
        """[B] a values -> [B] int64 index of the nearest table entry (first one on ties)."""
        table = self.alphas_cumprod_sqrt.to(alphas_cumprod_sqrt.device)
        return (alphas_cumprod_sqrt[None] - table[:, None]).abs().argmin(dim=0)

    def quantize(self, alphas_cumprod_sqrt: Tensor) -> Tensor:
        return self.alphas_cumprod_sqrt.to(alphas_cumprod_sqrt.device)[self.sigma_to_idx(alphas_cumprod_sqrt)]

    def scalings(self, alphas_cumprod_sqrt: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """[B] a, [B] idx -> (c_skip, c_out, c_in, c_noise), each [B], after quantising a."""
        return video_scaling(self.quantize(alphas_cumprod_sqrt), idx)

    def __call__(self, model: Network, x: Tensor, alphas_cumprod_sqrt: Tensor, idx: Tensor,
                 cond: dict, **model_kwargs) -> Tensor:
        """x [B, T, C, H, W] noised latents, a [B], idx [B] timesteps -> D [B, T, C, H, W]."""
        c_skip, c_out, c_in, c_noise = self.scalings(alphas_cumprod_sqrt, idx)
        v_hat = model(x * _per_sample(c_in, x), c_noise, cond, **model_kwargs)
        return v_hat * _per_sample(c_out, x) + x * _per_sample(c_skip, x)


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------

class VanillaCFG:
    """D = D_u + w (D_c - D_u) with a constant scale w; the model batch is [uncond; cond]."""

    def __init__(self, scale: float):
        self.scale = scale

    def scale_at(self, step_index: int, timestep: int, sampler_steps: int) -> float:
        return self.scale

    @staticmethod
    def batch(x: Tensor, cond: dict, uncond: dict) -> tuple[Tensor, dict]:
        """x [B, ...] -> [2B, ...] = [x; x]; every conditioning entry -> [uncond; cond]."""
        if set(cond) != set(uncond):
            raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} "
                             f"and {sorted(uncond)}")
        return torch.cat([x, x]), {key: torch.cat([uncond[key], cond[key]]) for key in cond}

    @staticmethod
    def combine(denoised: Tensor, scale: float) -> Tensor:
        """[2B, ...] = [D_u; D_c] -> [B, ...] guided D."""
        d_uncond, d_cond = denoised.chunk(2)
        return d_uncond + scale * (d_cond - d_uncond)


class DynamicCFG(VanillaCFG):
    """CogVideoX's dynamic guidance: w(k) = 1 + scale (1 - cos(pi (k / num_steps)^exp)) / 2.

    ``step_input="timestep"`` (official) feeds k = sampler_steps - DDPM timestep, which is negative
    for most steps, so w jumps pseudo-randomly in [1, 1 + scale]; ``"step_index"`` feeds the step
    counter k = 0, 1, ... and w rises smoothly from 1.  Evaluated with Python floats (math.cos) as
    officially: the cosine argument reaches ~1e12 rad, where float32 would give other numbers.
    """

    def __init__(self, scale: float, exp: float, num_steps: int, step_input: str = "timestep"):
        super().__init__(scale)
        self.exp, self.num_steps, self.step_input = exp, num_steps, step_input

    def schedule(self, k: float) -> float:
        return 1 + self.scale * (1 - math.cos(math.pi * (k / self.num_steps) ** self.exp)) / 2

    def schedule_input(self, step_index: int, timestep: int, sampler_steps: int) -> int:
        return sampler_steps - timestep if self.step_input == "timestep" else step_index

    def scale_at(self, step_index: int, timestep: int, sampler_steps: int) -> float:
        return self.schedule(self.schedule_input(step_index, timestep, sampler_steps))


def guider_from_config(cfg, key: str = "model.sampler_config.params.guider_config") -> VanillaCFG:
    """``target`` VanillaCFG -> constant scale; anything else (default) -> DynamicCFG."""
    p = cfg.params
    if cfg.target is not None and cfg.target.endswith("VanillaCFG"):
        return VanillaCFG(p.scale)
    if p.num_steps < 1:
        raise ConfigError(f"'{key}.params.num_steps' must be >= 1, got {p.num_steps}")
    if p.step_input == "timestep" and p.exp != int(p.exp):
        raise ConfigError(f"'{key}.params.exp' = {p.exp} must be an integer with step_input 'timestep' "
                          "(the schedule then raises negative numbers to this power)")
    return DynamicCFG(p.scale, p.exp, p.num_steps, p.step_input)


# ----------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------

class SamplingSchedule(NamedTuple):
    timesteps: Tensor  # [n] int64 DDPM timesteps, noisiest first (999 ... 19 for 50 steps)
    alphas: Tensor  # [n + 1] float32 a_0 = 0 (timestep 999) ... a_{n-1}, then a_n = 1


def half_log_snr(a: Tensor) -> Tensor:
    """lambda = log(a / sqrt(1 - a^2)); -inf at a = 0."""
    alpha_cumprod = a ** 2
    return ((alpha_cumprod / (1 - alpha_cumprod)) ** 0.5).log()


class VPSDEDPMPP2MSampler:
    """DPM-Solver++(2M) SDE in the a-parameterisation (official ``VPSDEDPMPP2MSampler``).

    Step i (a = a_i, a' = a_{i+1}, D = guided x_0 estimate at a):

        h      = lambda(a') - lambda(a)
        x'     = sqrt((1 - a'^2) / (1 - a^2)) e^{-h} x  -  expm1(-2h) a' D_hat
                 + sqrt(1 - a'^2) sqrt(1 - e^{-2h}) z,        z ~ N(0, I)
        D_hat  = D on step 0, else (1 + 1/(2r)) D - 1/(2r) D_prev with r = (lambda(a) - lambda(a_{i-1})) / h

    Step 0 has a = 0 (h = inf: x is multiplied by exactly 0); the last step returns D itself.
    Official random-draw pattern: one draw at step 0, two at every middle step (the first belongs to
    a discarded first-order proposal; ``draw_discarded_noise=False`` skips it, which changes the
    random stream), none at the last step.  x_T is used as given (no initial scaling).
    """

    def __init__(self, discretization: ZeroSNRDDPMDiscretization, guider: VanillaCFG,
                 denoiser: DiscreteDenoiser, num_steps: int = 50, draw_discarded_noise: bool = True):
        self.discretization, self.guider, self.denoiser = discretization, guider, denoiser
        self.num_steps = num_steps
        self.draw_discarded_noise = draw_discarded_noise

    @classmethod
    def from_config(cls, cfg, denoiser: DiscreteDenoiser, key: str = "model.sampler_config"):
        p = cfg.params
        disc = ZeroSNRDDPMDiscretization.from_config(p.discretization_config,
                                                     f"{key}.params.discretization_config")
        if not 2 <= p.num_steps <= disc.num_timesteps:
            raise ConfigError(f"'{key}.params.num_steps' = {p.num_steps} must be in 2..{disc.num_timesteps}")
        return cls(disc, guider_from_config(p.guider_config, f"{key}.params.guider_config"), denoiser,
                   p.num_steps, p.draw_discarded_noise)

    def schedule(self, device: torch.device | str = "cpu") -> SamplingSchedule:
        alphas, timesteps = self.discretization(self.num_steps)
        alphas = torch.cat([alphas.flip(0), alphas.new_ones(1)])
        return SamplingSchedule(timesteps.flip(0).to(device), alphas.to(device))

    @torch.no_grad()
    def __call__(self, model: Network, x: Tensor, cond: dict, uncond: dict,
                 noise_fn: Optional[NoiseFn] = None, callback: Optional[Callable[[int], None]] = None,
                 record: Optional[dict] = None, **model_kwargs) -> Tensor:
        """x_T [B, T, C, H, W] -> sample [B, T, C, H, W] (the last step's x_0 estimate).

        cond / uncond: {"crossattn": [B, L, D], optional "concat": [B, T, C', H, W]}.
        model_kwargs go to every model call as given (e.g. ``video_flow`` [2B, ...], uncond half first).
        noise_fn: source of the per-step Gaussians (default ``gaussian_noise()``).
        callback(i) after every step; ``record`` (a dict) receives per-step tensors ``step_timesteps``,
        ``step_alpha``, ``step_next_alpha``, ``step_cfg_scale``, ``step_x`` and ``step_denoised``.
        """
        noise_fn = noise_fn or gaussian_noise()
        schedule = self.schedule(x.device)
        steps = [] if record is not None else None
        denoised = None
        for i in range(self.num_steps):
            x, denoised = self.step(model, i, x, denoised, schedule, cond, uncond, noise_fn, model_kwargs,
                                    steps)
            if callback is not None:
                callback(i)
        if record is not None:
            record.update({key: torch.stack([s[key] for s in steps]) for key in steps[0]})
        return x

    def step(self, model: Network, i: int, x: Tensor, denoised_prev: Optional[Tensor],
             schedule: SamplingSchedule, cond: dict, uncond: dict, noise_fn: NoiseFn,
             model_kwargs: dict, steps: Optional[list] = None) -> tuple[Tensor, Tensor]:
        """Step i: guided x_0 estimate D at a_i, then the solver update to a_{i+1} -> (x_next, D)."""
        timestep = int(schedule.timesteps[i])
        a, a_next = schedule.alphas[i], schedule.alphas[i + 1]
        a_prev = schedule.alphas[i - 1] if i > 0 else None
        scale = self.guider.scale_at(i, timestep, self.num_steps)
        denoised = self.denoise(model, x, a, timestep, scale, cond, uncond, model_kwargs)
        if i == self.num_steps - 1:
            x_next = denoised
        else:
            x_next = self.update(x, denoised, denoised_prev, a_prev, a, a_next, noise_fn)
        if steps is not None:
            steps.append(dict(step_timesteps=torch.tensor(timestep), step_alpha=a, step_next_alpha=a_next,
                              step_cfg_scale=torch.tensor(scale, dtype=torch.float64), step_x=x_next,
                              step_denoised=denoised))
        return x_next, denoised

    def denoise(self, model: Network, x: Tensor, a: Tensor, timestep: int, scale: float,
                cond: dict, uncond: dict, model_kwargs: dict) -> Tensor:
        """One model call on the CFG batch [uncond; cond] -> guided D [B, ...] (float32)."""
        x_in, cond_in = self.guider.batch(x, cond, uncond)
        a_in = a.expand(x_in.shape[0])
        idx_in = x_in.new_full((x_in.shape[0],), timestep)  # official: the timestep in x's dtype
        denoised = self.denoiser(model, x_in, a_in, idx_in, cond_in, **model_kwargs).float()
        return self.guider.combine(denoised, scale)

    def update(self, x: Tensor, denoised: Tensor, denoised_prev: Optional[Tensor],
               a_prev: Optional[Tensor], a: Tensor, a_next: Tensor, noise_fn: NoiseFn) -> Tensor:
        """DPM-Solver++(2M) SDE from a to a_next (see the class docstring); first order when
        there is no previous estimate (step 0)."""
        lam, lam_next = half_log_snr(a), half_log_snr(a_next)
        h = lam_next - lam
        x_decay = ((1 - a_next ** 2) / (1 - a ** 2)) ** 0.5 * (-h).exp()
        denoised_gain = (-2 * h).expm1() * a_next  # negative: x' = ... - gain * D
        noise_std = (1 - a_next ** 2) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
        if denoised_prev is None:
            return x_decay * x - denoised_gain * denoised + noise_std * noise_fn(x)
        if self.draw_discarded_noise:
            noise_fn(x)  # official: noise of the discarded first-order proposal
        r = (lam - half_log_snr(a_prev)) / h
        denoised_2m = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * denoised_prev
        return x_decay * x - denoised_gain * denoised_2m + noise_std * noise_fn(x)


# ----------------------------------------------------------------------------------------------
# Training loss
# ----------------------------------------------------------------------------------------------

def rank_index_range(num_idx: int, rank: int, world_size: int) -> tuple[int, int]:
    """Timestep block [low, high) that data-parallel ``rank`` draws from (official uniform_sampling).

    The W ranks form G groups, G = the largest divisor of W that also divides num_idx; consecutive
    ranks share a group, and group g draws from the g-th of G equal contiguous blocks of indices
    (W = 8 -> 8 blocks of 125; W = 3 -> one block of all 1000).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"data-parallel rank {rank} is outside 0..{world_size - 1}")
    groups = max(g for g in range(1, world_size + 1) if world_size % g == 0 and num_idx % g == 0)
    block = num_idx // groups
    group = rank // (world_size // groups)
    return group * block, (group + 1) * block


class DiscreteSampling:
    """Training timesteps idx ~ U{low..high-1} and their table values a = table[idx]."""

    def __init__(self, discretization: ZeroSNRDDPMDiscretization, num_idx: int = 1000,
                 uniform_sampling: bool = False, rank: int = 0, world_size: int = 1):
        self.alphas_cumprod_sqrt = discretization(num_idx)[0]  # [num_idx], index = timestep
        self.low, self.high = (rank_index_range(num_idx, rank, world_size) if uniform_sampling
                               else (0, num_idx))

    @classmethod
    def from_config(cls, cfg, rank: int = 0, world_size: int = 1,
                    key: str = "model.loss_fn_config.params.sigma_sampler_config"):
        p = cfg.params
        disc = ZeroSNRDDPMDiscretization.from_config(p.discretization_config,
                                                     f"{key}.params.discretization_config")
        if not 2 <= p.num_idx <= disc.num_timesteps:
            raise ConfigError(f"'{key}.params.num_idx' = {p.num_idx} must be in 2..{disc.num_timesteps}")
        return cls(disc, p.num_idx, p.uniform_sampling, rank, world_size)

    def __call__(self, n: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """-> (a [n] float32, idx [n] int64) on the CPU (drawn there as officially, or on the
        generator's device)."""
        idx = torch.randint(self.low, self.high, (n,), generator=generator,
                            device=generator.device if generator is not None else "cpu").cpu()
        return self.alphas_cumprod_sqrt[idx], idx


class VideoDiffusionLoss:
    """v-prediction video diffusion loss, per sample:

        a = table[idx],   x_t = a x_0 + sqrt(1 - a^2) eps,   D = denoiser(x_t, a, idx)
        loss[b] = mean_{t,c,h,w} (D - x_0)^2 / (1 - a^2)          (= mean (v - v_hat)^2)

    Random draws in the official order: idx, eps = randn_like(x_0), then (offset noise only) one
    N(0, 1) per sample added to eps times ``offset_noise_level``.  ``idx`` / ``noise`` replace the
    first two draws when given (to replay recorded draws).  Text dropout and I2V image noising are
    the caller's: pass the resulting context and ``concat`` in ``cond``.
    """

    def __init__(self, sigma_sampler: DiscreteSampling, denoiser: DiscreteDenoiser,
                 offset_noise_level: float = 0.0):
        self.sigma_sampler, self.denoiser = sigma_sampler, denoiser
        self.offset_noise_level = offset_noise_level

    @classmethod
    def from_config(cls, cfg, denoiser: DiscreteDenoiser, rank: int = 0, world_size: int = 1,
                    key: str = "model.loss_fn_config"):
        p = cfg.params
        sigma_sampler = DiscreteSampling.from_config(p.sigma_sampler_config, rank, world_size,
                                                     f"{key}.params.sigma_sampler_config")
        return cls(sigma_sampler, denoiser, p.offset_noise_level)

    def __call__(self, model: Network, x0: Tensor, cond: dict, generator: Optional[torch.Generator] = None,
                 idx: Optional[Tensor] = None, noise: Optional[Tensor] = None,
                 record: Optional[dict] = None, **model_kwargs) -> Tensor:
        """x0 [B, T, C, H, W] clean latents -> loss [B]; ``record`` receives the intermediates."""
        batch = x0.shape[0]
        if idx is None:
            a, idx = self.sigma_sampler(batch, generator)
        else:
            a = self.sigma_sampler.alphas_cumprod_sqrt[idx.cpu()]
        a, idx = a.to(x0.device), idx.to(x0.device)
        if noise is None:
            noise = _randn(x0.shape, generator, x0.dtype, x0.device)
        if self.offset_noise_level > 0:  # official: drawn on the CPU
            offset = _randn(batch, generator, torch.float32, "cpu").to(x0.device)
            noise = noise + _per_sample(offset, x0) * self.offset_noise_level
        x0 = x0.float()
        noised_input = x0 * _per_sample(a, x0) + noise * _per_sample((1 - a ** 2) ** 0.5, x0)
        model_output = self.denoiser(model, noised_input, a, idx, cond, **model_kwargs)
        weight = 1 / (1 - a ** 2)
        loss = torch.mean((_per_sample(weight, x0) * (model_output - x0) ** 2).reshape(batch, -1), 1)
        if record is not None:
            record.update(alphas_cumprod_sqrt=a, idx=idx, noise=noise, noised_input=noised_input,
                          model_output=model_output, weight=weight)
        return loss
