"""The Tora diffusion transformer: CogVideoX-5B in SwissArmyTransformer form plus motion guidance.

One file, top to bottom: embeddings, 3-D RoPE, the AdaLN layer with its motion-guidance fuser
(MGF), the final layer, the trajectory extractor (TE), and the model that ties them together.
Parameter names follow the official SAT checkpoints exactly (``mixins.adaln_layer.fuser_list.3...``),
so the published weights load by key.

Shapes (full size): B batch, T = 13 latent frames, C = 16 latent channels, H x W = 60 x 90 latent
pixels, h x w = 30 x 45 patches, N = T*h*w = 17550 video tokens, L = 226 text tokens, D = 3072.

Forward, for video latents x [B, T, C, H, W], DDPM timesteps [B] and T5 context [B, L, 4096]:

    emb   = MLP(sinusoid(t))                                  [B, 512]
    h     = concat(text_proj(context), patch_conv(x))         [B, L+N, D]
    for every layer i:
        (shift, scale, gate) x {attention, mlp} x {video, text} = Linear_i(SiLU(emb))
        a      = LN1(h) * (1 + scale) + shift                  (video and text modulated separately)
        a_V    = a_V + GN(a_V) * gamma_i + beta_i              (MGF; gamma/beta from trajectory features)
        h     += gate * Attention(a)                           (qk-LayerNorm, 3-D RoPE on video q/k)
        h     += gate * MLP(LN2(h) * (1 + scale) + shift)
    out   = unpatchify(Linear(LN_final(LN(h_V)) * (1 + scale) + shift))   -> v-prediction [B, T, C, H, W]

Motion conditioning depends only on the trajectory, not on the denoising step, so
:meth:`DiffusionTransformer.prepare_motion` computes it once per video (extractor features, and
optionally every layer's gamma/beta) and the result is passed to every step.
"""
from __future__ import annotations

import math
from argparse import Namespace
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sat.model.base_model import BaseMixin, BaseModel
from sat.model.transformer import BaseTransformer
from sat.ops.layernorm import LayerNorm

from .runtime import init_distributed


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, in one pass over x."""
    return torch.addcmul(shift, x, 1 + scale)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps, **cos half first**."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding.to(dtype)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): rotation partner of interleaved pairs."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


# ----------------------------------------------------------------------------------------------
# Elementwise hot paths of a layer, as pure tensor functions (one place to fuse them: --compile
# replaces each by its torch.compile'd version, shared by all layers since only tensors go in).
# ----------------------------------------------------------------------------------------------

def modulated_norm(hidden, weight, bias, eps: float, text_length: int, text_shift, text_scale, shift, scale):
    """LayerNorm of [B, L+N, D] then AdaLN modulation -> (text [B, L, D], video [B, N, D])."""
    normed = F.layer_norm(hidden, hidden.shape[-1:], weight, bias, eps)
    return (modulate(normed[:, :text_length], text_shift, text_scale),
            modulate(normed[:, text_length:], shift, scale))


def gated_residual(hidden, branch, text_length: int, text_gate, gate):
    """hidden + gate * branch, with the text gate on the first ``text_length`` tokens."""
    return torch.cat([hidden[:, :text_length] + text_gate * branch[:, :text_length],
                      hidden[:, text_length:] + gate * branch[:, text_length:]], dim=1)


def qk_norm_rope(q, k, qk_ln: bool, q_weight, q_bias, k_weight, k_bias, eps: float, cos, sin):
    """q, k [B, S, heads, hd]: per-head LayerNorm (shared weights), then rotary (cos/sin [S, hd])."""
    if qk_ln:
        q = F.layer_norm(q, q.shape[-1:], q_weight, q_bias, eps)
        k = F.layer_norm(k, k.shape[-1:], k_weight, k_bias, eps)
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate_pairs(q) * sin, k * cos + rotate_pairs(k) * sin


def mgf_fuse(tokens, frames: int, num_groups: int, eps: float, norm_weight, norm_bias, gamma, beta):
    """MGF output tokens + GroupNorm(tokens) * gamma + beta for [B, T*h*w, D] tokens.

    GroupNorm statistics per (sample, frame, group) over the frame's tokens and the group's channels,
    in float32 (the official module asks for float32).  gamma/beta [B or 1, N, D].
    """
    b, n, d = tokens.shape
    x = tokens.float().view(b, frames, n // frames, num_groups, d // num_groups)
    var, mean = torch.var_mean(x, dim=(2, 4), keepdim=True, correction=0)
    x = ((x - mean) * torch.rsqrt(var + eps)).view(b, n, d)
    normed = (x * norm_weight.float() + norm_bias.float()).to(tokens.dtype)
    return tokens + normed * gamma + beta


KERNELS = {f.__name__: f for f in (modulated_norm, gated_residual, qk_norm_rope, mgf_fuse)}
_kernels = dict(KERNELS)  # the versions in use


def use_compiled_kernels(enabled: bool = True, **compile_options) -> None:
    """Swap the hot-path functions for torch.compile'd ones (regional compilation: a few small
    graphs compiled once, reused by every layer and step) or back to eager."""
    for name, fn in KERNELS.items():
        _kernels[name] = torch.compile(fn, dynamic=False, **compile_options) if enabled else fn


# ----------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------

class ImagePatchEmbeddingMixin(BaseMixin):
    """Per-frame 2x2 patch conv on video latents, Linear on T5 features; text tokens first."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int, text_hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.text_proj = nn.Linear(text_hidden_size, hidden_size)

    def word_embedding_forward(self, input_ids, **kwargs):
        images = kwargs["images"]  # [B, T, C, H, W]
        video = self.proj(images.flatten(0, 1))  # [(B T), D, h, w]
        video = rearrange(video, "(b t) d h w -> b (t h w) d", b=images.shape[0])
        text = self.text_proj(kwargs["encoder_outputs"])  # [B, L, D]
        return torch.cat([text, video], dim=1)


class Rotary3DPositionEmbeddingMixin(BaseMixin):
    """3-D rotary embedding of video tokens; head dim split [t: d/4 | y: 3d/8 | x: 3d/8].

    Frequencies 1/theta^(2j/d_axis) on integer grid positions, each angle used for two adjacent
    channels (interleaved pairs).  The tables ``freqs_cos``/``freqs_sin`` [N_max, head_dim] are
    persistent buffers (they are in the official checkpoints); text tokens are never rotated.
    The I2V config declares a learnable table ``pos_embedding`` that the official Tora model loads
    but never adds (OFFICIAL_QUIRKS.md#i2v-pos-table); ``add_learnable_pos_embed`` would add it (THUDM CogVideoX-I2V).
    """

    def __init__(self, latent_frames: int, patch_height: int, patch_width: int, hidden_size: int,
                 hidden_size_head: int, text_length: int, theta: float = 10000.0,
                 learnable_pos_embed: bool = False, add_learnable_pos_embed: bool = False):
        super().__init__()
        self.grid = (latent_frames, patch_height, patch_width)
        self.head_dim = hidden_size_head
        self.theta = theta
        self.text_length = text_length
        self.add_learnable_pos_embed = add_learnable_pos_embed
        cos, sin = self.rope_tables()
        self.register_buffer("freqs_sin", sin)
        self.register_buffer("freqs_cos", cos)
        if learnable_pos_embed:
            num_tokens = text_length + latent_frames * patch_height * patch_width
            self.pos_embedding = nn.Parameter(torch.zeros(1, num_tokens, hidden_size))
        else:
            self.pos_embedding = None

    def rope_tables(self):
        """cos/sin tables [T*h*w, head_dim] for the configured grid (float32)."""
        d = self.head_dim
        dims = (d // 4, d // 8 * 3, d // 8 * 3)
        angles = []
        for size, dim in zip(self.grid, dims):
            freqs = 1.0 / (self.theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
            angle = torch.arange(size, dtype=torch.float32)[:, None] * freqs[None]  # [size, dim/2]
            angles.append(angle.repeat_interleave(2, dim=-1))  # pairs share an angle
        t, y, x = self.grid
        full = torch.cat([
            angles[0][:, None, None].expand(t, y, x, -1),
            angles[1][None, :, None].expand(t, y, x, -1),
            angles[2][None, None, :].expand(t, y, x, -1),
        ], dim=-1).reshape(t * y * x, d)
        return full.cos(), full.sin()

    def reset_rope_tables(self):
        cos, sin = self.rope_tables()
        self.freqs_cos.copy_(cos)
        self.freqs_sin.copy_(sin)

    def sequence_tables(self, text_length: int, num_video: int, dtype: torch.dtype):
        """cos/sin for the whole [text; video] sequence: identity rotation on text tokens."""
        if num_video > self.freqs_cos.shape[0]:
            raise ValueError(f"{num_video} video tokens exceed the rotary table "
                             f"({self.freqs_cos.shape[0]} tokens for the configured grid {self.grid})")
        cos = self.freqs_cos[:num_video].to(dtype)
        sin = self.freqs_sin[:num_video].to(dtype)
        cos = torch.cat([cos.new_ones(text_length, self.head_dim), cos])
        sin = torch.cat([sin.new_zeros(text_length, self.head_dim), sin])
        return cos, sin

    def position_embedding_forward(self, position_ids, **kwargs):
        if self.pos_embedding is not None and self.add_learnable_pos_embed:
            return self.pos_embedding[:, : kwargs["seq_length"]]
        return None


# ----------------------------------------------------------------------------------------------
# Motion: trajectory extractor and motion-guidance fuser
# ----------------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """x + conv(relu(bn(conv(relu(bn(x))))))  - 3x3 convs, identity skip."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.block2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        y = self.block1(F.relu(self.bn1(x)))
        return x + self.block2(F.relu(self.bn2(y)))


class TrajExtractor(nn.Module):
    """Motion latents [B, C, T, H, W] -> one feature map [(B T), 128, H/2, W/2] per DiT layer.

    Pixel-unshuffle by 2 (channel index c*4 + 2*row + col), conv_in, then one level of
    ``num_res_blocks`` residual blocks per transformer layer; level i feeds layer i.
    Odd H/W are zero-padded on the right/bottom first.
    """

    def __init__(self, num_levels: int, channels: int = 128, num_res_blocks: int = 2,
                 latent_channels: int = 16, downscale: int = 2):
        super().__init__()
        self.num_res_blocks = num_res_blocks
        self.downscale = downscale
        self.unshuffle = nn.PixelUnshuffle(downscale)
        self.conv_in = nn.Conv2d(latent_channels * downscale ** 2, channels, 3, padding=1)
        self.body = nn.ModuleList(ResidualBlock(channels) for _ in range(num_levels * num_res_blocks))
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, motion_latents: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> stacked features [levels, (B T), channels, ceil(H/2), ceil(W/2)]."""
        s = self.downscale
        pad_h, pad_w = -motion_latents.shape[-2] % s, -motion_latents.shape[-1] % s
        if pad_h or pad_w:
            motion_latents = F.pad(motion_latents, (0, pad_w, 0, pad_h))
        x = rearrange(motion_latents, "b c t h w -> (b t) c h w")
        x = self.conv_in(self.unshuffle(x))
        features = []
        for i, block in enumerate(self.body):
            x = block(x)
            if (i + 1) % self.num_res_blocks == 0:
                features.append(x)
        return torch.stack(features)


class MotionGuidanceFuser(nn.Module):
    """MGF: a_V <- a_V + GroupNorm(a_V) * gamma + beta, with gamma/beta from trajectory features.

    gamma (and beta, with its own weights) = temporal Conv1d(k=3, ``temporal_padding`` at the first
    and last frame: "replicate" officially, or "zeros") along the
    latent frames of a spatial 3x3 Conv2d of the layer's extractor feature.  The temporal convs are
    zero-initialised, so a fresh MGF is the identity.  The GroupNorm is taken per frame (over the
    frame's tokens and the group's channels) in float32.
    """

    def __init__(self, feature_channels: int, hidden_size: int, num_groups: int = 32,
                 eps: float = 1e-5, temporal_padding: str = "replicate"):
        super().__init__()
        inner = hidden_size // 4
        self.flow_gamma_spatial = nn.Conv2d(feature_channels, inner, 3, padding=1)
        self.flow_gamma_temporal = nn.Conv1d(inner, hidden_size, 3, padding=1, padding_mode=temporal_padding)
        self.flow_beta_spatial = nn.Conv2d(feature_channels, inner, 3, padding=1)
        self.flow_beta_temporal = nn.Conv1d(inner, hidden_size, 3, padding=1, padding_mode=temporal_padding)
        self.flow_cond_norm = nn.GroupNorm(num_groups, hidden_size, eps=eps)
        for conv in (self.flow_gamma_temporal, self.flow_beta_temporal):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def modulation(self, feature: torch.Tensor, frames: int):
        """feature [(B T), F, h, w] -> (gamma, beta), each [B, T*h*w, D] in token order."""
        h, w = feature.shape[-2:]

        def branch(spatial, temporal):
            y = spatial(feature)  # [(B T), D/4, h, w]
            y = rearrange(y, "(b t) c h w -> (b h w) c t", t=frames)
            y = temporal(y)  # [(B h w), D, T]
            return rearrange(y, "(b h w) c t -> b (t h w) c", h=h, w=w)

        return (branch(self.flow_gamma_spatial, self.flow_gamma_temporal),
                branch(self.flow_beta_spatial, self.flow_beta_temporal))

    def forward(self, tokens: torch.Tensor, frames: int, gamma: torch.Tensor, beta: torch.Tensor):
        """tokens [B, N, D]; gamma/beta [B or 1, N, D] (1 broadcasts one motion over the batch)."""
        norm = self.flow_cond_norm
        return _kernels["mgf_fuse"](tokens, frames, norm.num_groups, norm.eps, norm.weight, norm.bias,
                                    gamma.to(tokens.dtype), beta.to(tokens.dtype))


# ----------------------------------------------------------------------------------------------
# The transformer layer (AdaLN + MGF + attention + MLP) and the final layer
# ----------------------------------------------------------------------------------------------

class AdaLNMixin(BaseMixin):
    """Owns the layer forward: 12-way AdaLN modulation, MGF, attention with qk-LN + RoPE, MLP."""

    def __init__(self, num_layers: int, hidden_size: int, time_embed_dim: int, head_dim: int,
                 qk_ln: bool = True, qk_layernorm_epsilon: float = 1e-6, elementwise_affine: bool = True,
                 traj_channels: int = 128, fuser_groups: int = 32, fuser_eps: float = 1e-5,
                 fuser_temporal_padding: str = "replicate"):
        super().__init__()
        self.adaLN_modulations = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, 12 * hidden_size)) for _ in range(num_layers))
        self.qk_ln = qk_ln
        if qk_ln:
            self.query_layernorm_list = nn.ModuleList(
                LayerNorm(head_dim, eps=qk_layernorm_epsilon, elementwise_affine=elementwise_affine)
                for _ in range(num_layers))
            self.key_layernorm_list = nn.ModuleList(
                LayerNorm(head_dim, eps=qk_layernorm_epsilon, elementwise_affine=elementwise_affine)
                for _ in range(num_layers))
        self.fuser_list = nn.ModuleList(
            MotionGuidanceFuser(traj_channels, hidden_size, fuser_groups, fuser_eps, fuser_temporal_padding)
            for _ in range(num_layers))
        self.layer_hooks = []  # objects with before_layer(i)/after_layer(i), e.g. weight streaming

    def layer_forward(self, hidden_states, mask, *args, **kw):
        i = int(kw["layer_id"])
        cache = kw.get("step_cache")
        if cache is not None and cache.skips_layer(i):
            return cache.skip(i, hidden_states)
        for hook in self.layer_hooks:
            hook.before_layer(i)
        out = self.block(i, hidden_states, kw)
        for hook in self.layer_hooks:
            hook.after_layer(i)
        if cache is not None:
            cache.after_layer(i, hidden_states, out)
        return out

    def block(self, i: int, hidden_states: torch.Tensor, kw: dict) -> torch.Tensor:
        """Layer i on [B, L+N, D] (text tokens first)."""
        text_length = kw["text_length"]
        layer = self.transformer.layers[i]
        mods = self.adaLN_modulations[i](kw["emb"]).unsqueeze(1).chunk(12, dim=-1)  # each [B, 1, D]
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         text_shift_msa, text_scale_msa, text_gate_msa,
         text_shift_mlp, text_scale_mlp, text_gate_mlp) = mods

        # Attention branch: modulated LayerNorm, MGF on the video part, attention, gated residual.
        ln = layer.input_layernorm
        text_in, video_in = _kernels["modulated_norm"](hidden_states, ln.weight, ln.bias, ln.eps, text_length,
                                                      text_shift_msa, text_scale_msa, shift_msa, scale_msa)
        video_in = self.fuse_motion(i, video_in, kw)
        attn = self.attention(layer, i, torch.cat([text_in, video_in], dim=1), kw["rope"])
        hidden_states = _kernels["gated_residual"](hidden_states, attn, text_length, text_gate_msa, gate_msa)

        # MLP branch.
        ln = layer.post_attention_layernorm
        text_in, video_in = _kernels["modulated_norm"](hidden_states, ln.weight, ln.bias, ln.eps, text_length,
                                                      text_shift_mlp, text_scale_mlp, shift_mlp, scale_mlp)
        mlp = layer.mlp(torch.cat([text_in, video_in], dim=1), layer_id=i)
        return _kernels["gated_residual"](hidden_states, mlp, text_length, text_gate_mlp, gate_mlp)

    def fuse_motion(self, i: int, video_in: torch.Tensor, kw: dict) -> torch.Tensor:
        """Apply layer i's MGF when motion conditioning is present (see prepare_motion)."""
        frames = kw["latent_frames"]
        if kw.get("motion_gamma") is not None:
            gamma, beta = kw["motion_gamma"][i], kw["motion_beta"][i]
        elif kw.get("motion_features") is not None:
            gamma, beta = self.fuser_list[i].modulation(kw["motion_features"][i], frames)
        else:
            return video_in
        fused = self.fuser_list[i](video_in, frames, gamma, beta)
        if kw.get("record") is not None:
            kw["record"][f"layer{i}_mgf_out"] = fused
        return fused

    def attention(self, layer, i: int, x: torch.Tensor, rope) -> torch.Tensor:
        """Full self-attention over [text; video]; qk-LayerNorm, then RoPE on video q/k only."""
        attention = layer.attention
        heads, head_dim = attention.num_attention_heads_per_partition, attention.hidden_size_per_attention_head
        qkv = attention.query_key_value(x).unflatten(-1, (3, heads, head_dim))  # [B, S, 3, heads, hd]
        q, k, v = qkv.unbind(dim=2)
        norm_params = (False, None, None, None, None, 0.0)
        if self.qk_ln:
            qn, kn = self.query_layernorm_list[i], self.key_layernorm_list[i]
            norm_params = (True, qn.weight, qn.bias, kn.weight, kn.bias, qn.eps)
        cos, sin = rope  # [S, hd], identity rows for text tokens
        q, k = _kernels["qk_norm_rope"](q, k, *norm_params, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return attention.dense(out.transpose(1, 2).flatten(2))


class FinalLayerMixin(BaseMixin):
    """Video tokens -> LN -> AdaLN(shift, scale) -> Linear -> unpatchify to [B, T, C, H, W]."""

    def __init__(self, hidden_size: int, time_embed_dim: int, patch_size: int, out_channels: int,
                 elementwise_affine: bool = True, layernorm_epsilon: float = 1e-6):
        super().__init__()
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=elementwise_affine, eps=layernorm_epsilon)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, 2 * hidden_size))

    def final_forward(self, logits, **kw):
        video = logits[:, kw["text_length"]:]
        shift, scale = self.adaLN_modulation(kw["emb"]).unsqueeze(1).chunk(2, dim=-1)
        video = self.linear(modulate(self.norm_final(video), shift, scale))
        t, h, w = kw["latent_frames"], kw["patch_grid"][0], kw["patch_grid"][1]
        p = self.patch_size
        return rearrange(video, "b (t h w) (c p q) -> b t c (h p) (w q)", t=t, h=h, w=w, p=p, q=p)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class DiffusionTransformer(BaseModel):
    """Tora DiT built from ``model.network_config.params`` (official field names).

    ``forward(x, timesteps, context, video_flow=None, motion=None, concat=None)`` returns the
    v-prediction.  Pass either raw ``video_flow`` motion latents [B, T, 16, H, W] (the extractor
    then runs inside this call, as officially) or ``motion`` from :meth:`prepare_motion`
    (computed once per video and reused by every denoising step).
    """

    def __init__(self, params, dtype: torch.dtype = torch.float32):
        targs = params.transformer_args
        modules = params.modules
        init_distributed()  # SAT's parallel linears need a (1-process) model-parallel group
        sat_args = Namespace(model_parallel_size=1)
        transformer = BaseTransformer(
            num_layers=params.num_layers, vocab_size=targs.vocab_size, hidden_size=params.hidden_size,
            num_attention_heads=params.num_attention_heads, max_sequence_length=targs.max_sequence_length,
            layernorm_order=targs.layernorm_order, layernorm_epsilon=targs.layernorm_epsilon,
            checkpoint_activations=targs.checkpoint_activations, is_decoder=targs.is_decoder,
            activation_func=lambda x: F.gelu(x, approximate="tanh"), params_dtype=torch.float32,
            skip_init=targs.skip_init, parallel_output=True)
        super().__init__(sat_args, transformer=transformer)
        del self.transformer.word_embeddings  # replaced by the patch embedding (not in checkpoints)
        self.params = params

        p = params.patch_size
        self.patch_grid = (params.latent_height // p, params.latent_width // p)
        self.latent_frames = (params.num_frames - 1) // params.time_compressed_rate + 1
        head_dim = params.hidden_size // params.num_attention_heads
        self.time_embed = nn.Sequential(
            nn.Linear(params.hidden_size, params.time_embed_dim), nn.SiLU(),
            nn.Linear(params.time_embed_dim, params.time_embed_dim))
        te = params.traj_extractor
        self.traj_extractor = TrajExtractor(params.num_layers, te.channels, te.num_res_blocks,
                                            te.latent_channels, te.downscale)
        pe = modules.pos_embed_config.params
        self.add_mixin("pos_embed", Rotary3DPositionEmbeddingMixin(
            self.latent_frames, *self.patch_grid, params.hidden_size, pe.hidden_size_head, pe.text_length,
            pe.theta, pe.learnable_pos_embed, pe.add_learnable_pos_embed))
        self.add_mixin("patch_embed", ImagePatchEmbeddingMixin(
            params.in_channels, params.hidden_size, p, modules.patch_embed_config.params.text_hidden_size))
        ad = modules.adaln_layer_config.params
        self.add_mixin("adaln_layer", AdaLNMixin(
            params.num_layers, params.hidden_size, params.time_embed_dim, head_dim, ad.qk_ln,
            ad.qk_layernorm_epsilon, params.elementwise_affine, te.channels,
            params.fuser.num_groups, params.fuser.eps, params.fuser.temporal_padding))
        self.add_mixin("final_layer", FinalLayerMixin(
            params.hidden_size, params.time_embed_dim, p, params.out_channels, params.elementwise_affine,
            modules.final_layer_config.params.layernorm_epsilon))
        self.to(dtype)

    # -- properties ------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.time_embed[0].weight.device

    @property
    def fusers(self):
        return self.mixins.adaln_layer.fuser_list

    # -- motion ----------------------------------------------------------------------------------
    def prepare_motion(self, video_flow: torch.Tensor, cache: str = "modulation") -> dict:
        """Motion conditioning for every layer, computed once per video.

        video_flow: motion latents [B, T, 16, H, W] (B may be 1 to share one motion across a batch).
        cache="features": the extractor output only (gamma/beta are derived in every step);
        cache="modulation": also every layer's gamma/beta [layers, B, N, D] (no motion work per step).
        Returns the keyword arguments to pass to :meth:`forward` as ``motion=``.
        """
        self.check_latent_shape(video_flow, "video_flow")
        features = self.traj_extractor(video_flow.to(self.dtype).transpose(1, 2))
        frames = video_flow.shape[1]
        if cache == "features":
            return {"motion_features": features}
        if cache != "modulation":
            raise ValueError(f"unknown motion cache level {cache!r}; use 'features' or 'modulation'")
        pairs = [fuser.modulation(features[i], frames) for i, fuser in enumerate(self.fusers)]
        return {"motion_gamma": torch.stack([g for g, _ in pairs]),
                "motion_beta": torch.stack([b for _, b in pairs])}

    def check_latent_shape(self, x: torch.Tensor, name: str) -> None:
        if x.dim() != 5:
            raise ValueError(f"{name} must be [B, T, C, H, W], got shape {tuple(x.shape)}")
        t, h, w = x.shape[1], x.shape[-2], x.shape[-1]
        p = self.params
        if (h, w) != (p.latent_height, p.latent_width):
            raise ValueError(
                f"{name} has latent size {h}x{w}, but the model is configured for "
                f"{p.latent_height}x{p.latent_width} (model.network_config.params.latent_height/"
                f"latent_width; pixels = 8x that)")
        if t > self.latent_frames:
            raise ValueError(f"{name} has {t} latent frames; the model supports at most "
                             f"{self.latent_frames} (num_frames {p.num_frames})")

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                video_flow: Optional[torch.Tensor] = None, motion: Optional[dict] = None,
                concat: Optional[torch.Tensor] = None, record: Optional[dict] = None, **kwargs):
        """x [B, T, Cin, H, W] (or the 16 noisy channels plus ``concat``), timesteps [B],
        context [B, L, text_hidden] -> v-prediction [B, T, out_channels, H, W].

        ``record``: optional dict that receives intermediates (emb, layer outputs, MGF outputs).
        """
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=2)
        if x.shape[2] != self.params.in_channels:
            raise ValueError(f"x has {x.shape[2]} channels, the model expects "
                             f"{self.params.in_channels} (model.network_config.params.in_channels)")
        self.check_latent_shape(x, "x")
        if motion is None and video_flow is not None:
            motion = self.prepare_motion(video_flow, cache="features")
        dtype = self.dtype
        x = x.to(dtype)
        context = context.to(dtype)
        emb = self.time_embed(timestep_embedding(timesteps, self.params.hidden_size, dtype=dtype))
        text_length = context.shape[1]
        num_video = x.shape[1] * self.patch_grid[0] * self.patch_grid[1]
        rope = self.mixins.pos_embed.sequence_tables(text_length, num_video, dtype)
        placeholder = torch.ones(1, 1, device=x.device, dtype=dtype)  # SAT wants ids and a mask
        kw = dict(images=x, encoder_outputs=context, emb=emb, text_length=text_length, rope=rope,
                  latent_frames=x.shape[1], patch_grid=self.patch_grid, seq_length=text_length + num_video,
                  **(motion or {}), **kwargs)
        if record is not None:
            record["emb"] = emb
            kw["record"] = record
            kw["output_hidden_states"] = True
            out, *per_layer = super().forward(input_ids=placeholder, position_ids=placeholder,
                                              attention_mask=placeholder, **kw)
            for i, layer_out in enumerate(per_layer):
                record[f"layer{i}_out"] = layer_out["hidden_states"]
            return out
        return super().forward(input_ids=placeholder, position_ids=placeholder,
                               attention_mask=placeholder, **kw)[0]
