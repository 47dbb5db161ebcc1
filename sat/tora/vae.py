"""The 3-D causal VAE of CogVideoX (Tora's first stage), on diffusers' ``AutoencoderKLCogVideoX``.

The network is diffusers' (the same as the official SAT ``vae_modules``, see
OFFICIAL_QUIRKS.md#vae-diffusers-keys); this file adds what the official code does around it:

* construction from the official config (``model.first_stage_config.params``), rejecting what the
  network cannot represent;
* the official ``3d-vae.pt`` format (``{"state_dict": {"encoder.down.0.block.0...": ...}}``), read
  strictly and written back, through a key converter official <-> diffusers; a diffusers ``vae/`` folder
  (``ckpt_path`` pointing at it) is read strictly under its own names;
* the official numerics of encode and decode, one sample at a time:

      moments  = Encoder(video)                    all frames in one call     [B, 2C, t, h, w]
      mean, logvar = split(moments); logvar = clamp(logvar, -30, 20)
      z        = mean + exp(logvar / 2) * eps      one eps draw for the batch [B, C, t, h, w]
      video    = concat_k Decoder(z[:, :, span_k], cache)  chunks [0:3], [3:5], ...  [B, 3, f, H, W]

Shapes: video [B, 3, f, H, W] in [-1, 1] with f = 1 + 4k frames; latents [B, C=16, t = 1 + k, H/8, W/8].

Causal-conv cache ("fake context parallel", OFFICIAL_QUIRKS.md#vae-chunked-decode): every 3-d conv with kernel k_t > 1 pads a call
with k_t - 1 copies of its first frame; when a clip is processed in temporal chunks, diffusers' modules
return the last k_t - 1 (padded) input frames of each conv as ``conv_cache``, and feeding that to the
next chunk replaces the replicated padding - exactly the official cache.  The group norms still take
their statistics over one chunk, which is why the chunk boundaries are part of the numerics.

The latent scale factor (0.7) is applied by the diffusion engine, not here.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKLCogVideoX
from omegaconf import DictConfig
from torch import nn

from .checkpoint import CheckpointError, atomic_torch_save, check_keys, load_state_dict
from .config import ConfigError, merge, schema, validate

CONFIG_PATH = "model.first_stage_config.params"
VAE_CLASS = "AutoencoderKLCogVideoX"  # the class of a diffusers ``vae/`` folder
STATE_DICT_ENTRY = "state_dict"  # 3d-vae.pt = torch.save({"state_dict": official_state_dict})
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # DiagonalGaussianRegularizer clamps the log-variance
NORM_GROUPS, NORM_EPS = 32, 1e-6  # every (spatial) group norm of the official VAE

# Key renames official <-> diffusers besides the level/mid-block numbering (OFFICIAL_QUIRKS.md#vae-diffusers-keys).
_KEY_PARTS = ((".block.", ".resnets."), (".downsample.", ".downsamplers.0."),
              (".upsample.", ".upsamplers.0."), (".nin_shortcut.", ".conv_shortcut."))


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

def first_stage_params_from(first_stage_config: dict, source: str) -> DictConfig:
    """Validated ``first_stage_config.params`` from a plain ``{target, params}`` mapping
    (e.g. the VAE entry of a dumped official config)."""
    cfg = merge(schema(), {"model": {"first_stage_config": first_stage_config}}, source)
    validate(cfg)
    return cfg.model.first_stage_config.params


def diffusers_arguments(params: DictConfig) -> dict:
    """Map the official encoder/decoder config onto ``AutoencoderKLCogVideoX`` arguments.

    Raises ConfigError, naming the key, for settings the network cannot represent.
    """
    enc, dec = params.encoder_config.params, params.decoder_config.params
    for name, coder in (("encoder_config", enc), ("decoder_config", dec)):
        where = f"{CONFIG_PATH}.{name}.params"
        if len(coder.attn_resolutions):
            raise ConfigError(f"'{where}.attn_resolutions' = {list(coder.attn_resolutions)}: the CogVideoX "
                              f"VAE has no attention blocks; use []")
        if coder.dropout != 0:
            raise ConfigError(f"'{where}.dropout' = {coder.dropout}: the VAE is frozen, only 0.0 is supported")
        bad = [coder.ch * m for m in coder.ch_mult if (coder.ch * m) % NORM_GROUPS]
        if bad:
            raise ConfigError(f"'{where}.ch' x 'ch_mult' gives {bad} channels, not divisible by the "
                              f"{NORM_GROUPS} group-norm groups")
    for key in ("ch", "ch_mult", "num_res_blocks", "z_channels", "temporal_compress_times"):
        if enc[key] != dec[key]:
            raise ConfigError(f"'{CONFIG_PATH}.encoder_config.params.{key}' = {enc[key]} and "
                              f"'{CONFIG_PATH}.decoder_config.params.{key}' = {dec[key]} differ; the "
                              f"network shares them")
    levels = len(enc.ch_mult)
    time_levels = enc.temporal_compress_times.bit_length() - 1
    if enc.temporal_compress_times != 2 ** time_levels or time_levels > levels - 1:
        raise ConfigError(f"'{CONFIG_PATH}.encoder_config.params.temporal_compress_times' = "
                          f"{enc.temporal_compress_times}: must be a power of 2 up to 2^{levels - 1}")
    if not enc.double_z:
        raise ConfigError(f"'{CONFIG_PATH}.encoder_config.params.double_z' = false: the Gaussian posterior "
                          f"needs mean and log-variance (true)")
    if params.cp_size != 1:
        raise ConfigError(f"'{CONFIG_PATH}.cp_size' = {params.cp_size}: context parallelism is not supported (1)")
    return dict(
        in_channels=enc.in_channels,
        out_channels=dec.out_ch,
        down_block_types=("CogVideoXDownBlock3D",) * levels,
        up_block_types=("CogVideoXUpBlock3D",) * levels,
        block_out_channels=tuple(enc.ch * m for m in enc.ch_mult),
        latent_channels=enc.z_channels,
        layers_per_block=enc.num_res_blocks,  # the decoder has one more per level, in both codes
        norm_num_groups=NORM_GROUPS,
        norm_eps=NORM_EPS,
        temporal_compression_ratio=enc.temporal_compress_times,
    )


def _check_schedule(params: DictConfig) -> None:
    time_factor = params.encoder_config.params.temporal_compress_times
    checks = (
        ("decode_chunk_latent_frames", params.decode_chunk_latent_frames % 2 == 0,
         "0 (one call) or an even number of latent frames"),
        ("encode_chunk_frames", params.encode_chunk_frames % time_factor == 0,
         f"0 (one call) or a multiple of temporal_compress_times ({time_factor})"),
    )
    for coder in ("decode", "encode"):
        size, overlap = params[f"{coder}_tile_latent_size"], params[f"{coder}_tile_overlap_latent"]
        checks += ((f"{coder}_tile_overlap_latent", overlap >= 0, "at least 0"),
                   (f"{coder}_tile_latent_size", size == 0 or size > overlap,
                    f"0 (no tiling) or larger than {coder}_tile_overlap_latent"))
    for key, ok, rule in checks:
        if not ok or params[key] < 0:
            raise ConfigError(f"'{CONFIG_PATH}.{key}' = {params[key]}: must be {rule}")


# ----------------------------------------------------------------------------------------------
# Checkpoint keys: official <-> diffusers
# ----------------------------------------------------------------------------------------------

def official_to_diffusers_key(key: str, num_levels: int) -> str:
    """'decoder.up.3.block.0.nin_shortcut.weight' -> 'decoder.up_blocks.0.resnets.0.conv_shortcut.weight'.

    The official decoder numbers its levels like the encoder (0 = full resolution); diffusers numbers
    them in execution order, deepest first.
    """
    key = re.sub(r"^(encoder|decoder)\.mid\.block_(\d+)\.",
                 lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.", key)
    for official, diffusers in _KEY_PARTS:
        key = key.replace(official, diffusers)
    return key


def diffusers_to_official_key(key: str, num_levels: int) -> str:
    """Inverse of :func:`official_to_diffusers_key`."""
    key = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                 lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.", r"encoder.down.\1.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.", key)
    for official, diffusers in _KEY_PARTS:
        key = key.replace(diffusers, official)
    return key


def read_official_state_dict(path: str | os.PathLike, ignore_keys=("loss",)) -> dict[str, torch.Tensor]:
    """Tensors of an official ``3d-vae.pt`` (weights_only), without keys starting with ``ignore_keys``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"VAE checkpoint not found: {path} ({CONFIG_PATH}.ckpt_path; get 3d-vae.pt "
                              f"as described in the README section 'Weights')")
    state = load_state_dict(path, entry=STATE_DICT_ENTRY)
    return {k: v for k, v in state.items() if not k.startswith(tuple(ignore_keys))}


# ----------------------------------------------------------------------------------------------
# Posterior and chunk schedule
# ----------------------------------------------------------------------------------------------

class Posterior:
    """Diagonal Gaussian q(z | video) given by the encoder output.

    moments [B, 2C, t, h, w]: mean in the first C channels, log-variance in the last C (raw);
    ``mean`` and ``logvar`` (clamped to [-30, 20]) are [B, C, t, h, w].
    """

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def sample(self, eps: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + exp(logvar / 2) * eps.

        ``eps`` [B, C, t, h, w] defaults to ONE standard-normal draw for the whole batch (sample b gets
        eps[b]), as in the official code (golden ``pipeline_t2v``: noise_000 has the batch shape), from
        ``generator`` or the global RNG of the latents' device.
        """
        if eps is None:
            eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        elif eps.shape != self.mean.shape:
            raise ValueError(f"eps has shape {tuple(eps.shape)}, the posterior {tuple(self.mean.shape)}")
        return self.mean + torch.exp(0.5 * self.logvar) * eps


def chunk_spans(num_frames: int, chunk: int) -> list[tuple[int, int]]:
    """Frame spans [start, end) of a chunked causal pass: chunks of ``chunk`` frames, the first one
    also taking the remainder (``num_frames % chunk``); ``chunk`` 0 = one span.

    chunk_spans(13, 2) = [(0, 3), (3, 5), ..., (11, 13)]: the official decode of sample_video.py, which
    however loops (T-1)//2 times and so drops the last latent frame of an even T; here an even T gets
    [(0, 2), (2, 4), ...] and all 4T frames, like a one-call decode.  chunk_spans(17, 8) =
    [(0, 9), (9, 17)]: diffusers' 8-frame encoder batches.
    """
    if chunk == 0:
        return [(0, num_frames)]
    first = min(chunk + num_frames % chunk, num_frames)
    return [(0, first)] + [(start, start + chunk) for start in range(first, num_frames, chunk)]


def _causal_chunks(coder: nn.Module, frames: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Run diffusers' encoder or decoder over ``spans`` of the frame axis (dim 2), handing each
    chunk the causal-conv cache of the previous one; the cache is dropped after the last chunk."""
    cache, outputs = None, []
    for start, end in spans:
        output, cache = coder(frames[:, :, start:end], conv_cache=cache)
        outputs.append(output)
    return torch.cat(outputs, dim=2)


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of equal tiles of ``tile`` covering [0, length), overlapping by at least ``overlap``."""
    starts = list(range(0, max(length - tile, 0) + 1, tile - overlap))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _spatially_tiled(run, x: torch.Tensor, tile: int, overlap: int, x_per_latent: int, out_per_latent: int):
    """Apply ``run`` to overlapping spatial tiles of x [1, C, f, H, W] and blend the outputs with linear
    ramps over the overlap (weights normalised per pixel).  ``tile``/``overlap`` are in latent pixels;
    one latent pixel is ``x_per_latent`` pixels of x and ``out_per_latent`` pixels of the output
    (decode: 1 and 8; encode: 8 and 1)."""
    height, width = x.shape[-2] // x_per_latent, x.shape[-1] // x_per_latent
    out = weight_sum = None
    for top in _tile_starts(height, tile, overlap):
        for left in _tile_starts(width, tile, overlap):
            rows_in = slice(top * x_per_latent, (top + tile) * x_per_latent)
            cols_in = slice(left * x_per_latent, (left + tile) * x_per_latent)
            piece = run(x[..., rows_in, cols_in])
            rows, cols = piece.shape[-2:]
            ramp = overlap * out_per_latent
            weight = (_blend_ramp(rows, ramp, top > 0, top + tile < height)[:, None]
                      * _blend_ramp(cols, ramp, left > 0, left + tile < width)[None]).to(piece)
            if out is None:
                out = piece.new_zeros(*piece.shape[:3], height * out_per_latent, width * out_per_latent)
                weight_sum = piece.new_zeros(height * out_per_latent, width * out_per_latent)
            region = (slice(top * out_per_latent, top * out_per_latent + rows),
                      slice(left * out_per_latent, left * out_per_latent + cols))
            out[(..., *region)] += piece * weight
            weight_sum[region] += weight
    return out / weight_sum


def _blend_ramp(size: int, ramp: int, rise: bool, fall: bool) -> torch.Tensor:
    """Tile weights [size] along one axis: linear ramps (never 0) over ``ramp`` pixels at shared edges."""
    weight = torch.ones(size)
    ramp = min(ramp, size)
    up = torch.arange(1, ramp + 1) / (ramp + 1)
    if rise:
        weight[:ramp] = up
    if fall:
        weight[size - ramp:] = torch.minimum(weight[size - ramp:], up.flip(0))
    return weight


# ----------------------------------------------------------------------------------------------
# The autoencoder
# ----------------------------------------------------------------------------------------------

class VideoAutoencoder(nn.Module):
    """The official first stage (VideoAutoencoderInferenceWrapper) around diffusers' network.

    ``params`` is ``cfg.model.first_stage_config.params``.  ``self.autoencoder`` holds the diffusers
    ``AutoencoderKLCogVideoX``; its state dict is converted to and from the official key scheme.
    """

    def __init__(self, params: DictConfig):
        super().__init__()
        _check_schedule(params)
        self.autoencoder = AutoencoderKLCogVideoX(**diffusers_arguments(params))
        self.params = params
        self.num_levels = len(params.encoder_config.params.ch_mult)
        self.spatial_compression = 2 ** (self.num_levels - 1)
        self.latent_channels = params.encoder_config.params.z_channels

    # -- checkpoints --------------------------------------------------------------------------

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the official ``3d-vae.pt`` keys (``encoder.down.0.block.0...``)."""
        return {diffusers_to_official_key(k, self.num_levels): v for k, v in self.autoencoder.state_dict().items()}

    def load_official(self, path: str | os.PathLike | None = None) -> None:
        """Load an official ``3d-vae.pt`` (default ``ckpt_path``) strictly: missing, unexpected or
        mis-shaped keys raise CheckpointError listing them (official names)."""
        path = path if path is not None else self.params.ckpt_path
        if path is None:
            raise CheckpointError(f"no VAE checkpoint given and '{CONFIG_PATH}.ckpt_path' is null")
        if Path(path).is_dir():  # a diffusers ``vae/`` folder: already this network's key names
            self.load_diffusers(path)
            return
        found = read_official_state_dict(path, self.params.ignore_keys)
        check_keys(self.official_state_dict(), found, str(path), optional=())
        converted = {official_to_diffusers_key(k, self.num_levels): v for k, v in found.items()}
        self.autoencoder.load_state_dict(converted, strict=True)

    def load_diffusers(self, path: str | os.PathLike) -> None:
        """Load a diffusers ``AutoencoderKLCogVideoX`` folder (``vae/`` of a diffusers model, or the model
        folder holding it) strictly, tensor by tensor."""
        from .diffusers_format import CONFIG_FILE, DiffusersFormatError, SafetensorsFolder

        path = Path(path)
        folder = SafetensorsFolder(path / "vae" if (path / "vae" / CONFIG_FILE).is_file() else path)
        if folder.class_name != VAE_CLASS:
            raise DiffusersFormatError(f"{folder.dir / CONFIG_FILE}: _class_name is {folder.class_name!r}, "
                                       f"expected {VAE_CLASS!r} ({CONFIG_PATH}.ckpt_path)")
        folder.load_into(self.autoencoder, f"diffusers VAE, {CONFIG_PATH}.ckpt_path")

    def save_diffusers(self, path: str | os.PathLike, scaling_factor: float) -> None:
        """Write a diffusers ``AutoencoderKLCogVideoX`` folder (config.json + safetensors).

        ``scaling_factor`` (the engine's ``model.scale_factor``, 0.7 for CogVideoX-5B) goes into config.json:
        diffusers pipelines scale latents by it (the class default, 1.15, is CogVideoX-2B's)."""
        self.autoencoder.register_to_config(scaling_factor=scaling_factor)
        self.autoencoder.save_pretrained(path, safe_serialization=True)

    def save_official(self, path: str | os.PathLike) -> None:
        """Write an official-format ``3d-vae.pt`` (atomically)."""
        state = {k: v.detach().cpu() for k, v in self.official_state_dict().items()}
        atomic_torch_save({STATE_DICT_ENTRY: state}, Path(path))

    # -- encode / decode ----------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    @torch.no_grad()
    def encode(self, video: torch.Tensor, chunk_frames: int | None = None) -> Posterior:
        """video [B, 3, f, H, W] in [-1, 1] -> posterior over latents [B, C, t, H/8, W/8].

        ``encode_batch_size`` samples at a time (official: one); each sample's frames go through the
        encoder in one call (official) or in
        chunks of ``chunk_frames`` (default ``encode_chunk_frames``) linked by the causal-conv cache.
        With ``encode_tile_latent_size`` set, larger videos are encoded in blended spatial tiles.
        """
        _check_layout(video, self.autoencoder.config.in_channels, "video", "b c f h w")
        chunk = self.params.encode_chunk_frames if chunk_frames is None else chunk_frames
        spans = chunk_spans(video.shape[2], chunk)
        encode_one = functools.partial(_causal_chunks, self.autoencoder.encoder, spans=spans)
        tile, s = self.params.encode_tile_latent_size, self.spatial_compression
        if tile and max(video.shape[-2:]) > tile * s:
            encode_one = functools.partial(_spatially_tiled, encode_one, tile=tile,
                                           overlap=self.params.encode_tile_overlap_latent,
                                           x_per_latent=s, out_per_latent=1)
        step = max(1, self.params.encode_batch_size)
        moments = [encode_one(video[i:i + step].to(self.dtype)) for i in range(0, len(video), step)]
        return Posterior(torch.cat(moments))

    @torch.no_grad()
    def decode(self, z: torch.Tensor, spans: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Latents z [B, C, t, h, w] (unscaled) -> video [B, 3, f, 8h, 8w], one sample at a time.

        ``spans`` (latent-frame ranges decoded per call, carrying the causal-conv cache) defaults to
        ``chunk_spans(t, decode_chunk_latent_frames)``: [0:3], [3:5], ... as the official sampler.
        With ``decode_tile_latent_size`` set, larger latents are decoded in blended spatial tiles.
        """
        _check_layout(z, self.latent_channels, "z", "b c t h w")
        if spans is None:
            spans = chunk_spans(z.shape[2], self.params.decode_chunk_latent_frames)
        tile = self.params.decode_tile_latent_size
        decode_one = self._decode_tiled if tile and max(z.shape[-2:]) > tile else self._decode_untiled
        return torch.cat([decode_one(sample[None].to(self.dtype), spans) for sample in z])

    def reconstruct(self, video: torch.Tensor, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, Posterior]:
        """With autograd, for training the VAE: video [B, 3, f, H, W] in [-1, 1] -> (reconstruction
        [B, 3, f, H, W], posterior).  The whole batch in one encoder call and one decoder call over
        ``decode_chunk_latent_frames`` chunks (the chunking sampling decodes with); no tiling."""
        _check_layout(video, self.autoencoder.config.in_channels, "video", "b c f h w")
        posterior = Posterior(_causal_chunks(self.autoencoder.encoder, video.to(self.dtype),
                                             [(0, video.shape[2])]))
        z = posterior.sample(generator=generator)
        spans = chunk_spans(z.shape[2], self.params.decode_chunk_latent_frames)
        return _causal_chunks(self.autoencoder.decoder, z, spans), posterior

    def _decode_untiled(self, z: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
        return _causal_chunks(self.autoencoder.decoder, z, spans)

    def _decode_tiled(self, z: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
        return _spatially_tiled(lambda piece: self._decode_untiled(piece, spans), z,
                                self.params.decode_tile_latent_size, self.params.decode_tile_overlap_latent,
                                1, self.spatial_compression)


def _check_layout(x: torch.Tensor, channels: int, name: str, layout: str) -> None:
    if x.dim() != 5 or x.shape[1] != channels:
        raise ValueError(f"{name} must be [{layout}] with {channels} channels, got shape {tuple(x.shape)}")


def load_vae(params: DictConfig, path: str | os.PathLike | None = None) -> VideoAutoencoder:
    """Build the VAE of ``params`` (``cfg.model.first_stage_config.params``) and load the official
    checkpoint at ``path`` (default ``params.ckpt_path``); returned in eval mode."""
    vae = VideoAutoencoder(params)
    vae.load_official(path)
    return vae.eval()
