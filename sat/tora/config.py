"""Configuration: stacked YAML files + command-line overrides, validated against one typed schema.

Configs are the interface of this project.  The schema below mirrors the official Tora/CogVideoX
YAML layout (``model.network_config.params.*``, ``model.sampler_config.params.*`` ...) so the values of
an existing official config carry over; every official quirk that used to be a hidden constant is a
named setting whose default is the official value (docs/OFFICIAL_QUIRKS.md lists them).

One value, one place: the values the official YAML repeats are linked to their one place (LINKED,
with the rule there); the official keys that do nothing here are accepted only as listed in IGNORED,
each with the reason.

    cfg = load_config(["configs/tora/model/cogvideox_5b_tora.yaml", "configs/tora/inference.yaml"],
                      overrides=["model.sampler_config.params.num_steps=20"])

Later files override earlier ones, overrides override files.  An unknown key, a value of the wrong
type, an unknown ``target`` or a disagreeing copy is a :class:`ConfigError` naming the key path and
the file (or "command line") it came from.
"""
from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from .errors import ToraError

logger = logging.getLogger(__name__)


class ConfigError(ToraError, ValueError):
    """A configuration problem, with the key path and source in the message."""


class Targeted:
    """``Targeted[P]``: the official ``{target, params}`` node around the params dataclass ``P``.

    ``target`` is optional; when given it must be one of TARGETS (an official class path or this
    project's name).  One generated dataclass per ``P``, so OmegaConf validates ``params`` as ``P``.
    """
    _made: dict = {}

    def __class_getitem__(cls, params_cls):
        if params_cls not in cls._made:
            node = make_dataclass(f"Targeted{params_cls.__name__}", [
                ("target", Optional[str], None), ("params", params_cls, field(default_factory=params_cls))])
            node.__module__ = __name__
            cls._made[params_cls] = node
        return cls._made[params_cls]


def targeted(params_cls):
    """The dataclass field of a ``Targeted[params_cls]`` node with the schema defaults."""
    return field(default_factory=Targeted[params_cls])


# ----------------------------------------------------------------------------------------------
# The DiT (network_config)
# ----------------------------------------------------------------------------------------------

@dataclass
class TransformerArgs:
    checkpoint_activations: bool = False  # a copy of args.checkpoint_activations (LINKED)
    vocab_size: int = 1
    max_sequence_length: int = 64  # size of SAT's (unused, but checkpointed) position table
    layernorm_order: str = "pre"
    skip_init: bool = False
    model_parallel_size: int = 1
    is_decoder: bool = False
    # The official DiT asks for 1e-6, but SAT's own ``layernorm_epsilon`` (default 1e-5) overrides it
    # for input/post-attention/final layer norms; the released weights were trained with 1e-5.
    layernorm_epsilon: float = 1e-5
    # Filled in by the official code at run time (present in dumped configs): copies (LINKED).
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    parallel_output: Optional[bool] = None


@dataclass
class PosEmbedParams:
    hidden_size_head: int = 64
    text_length: int = 226
    # I2V checkpoints carry a learnable table; the official Tora code never adds it
    # (OFFICIAL_QUIRKS.md#i2v-pos-table).
    learnable_pos_embed: bool = False
    add_learnable_pos_embed: bool = False  # True would follow THUDM's CogVideoX-I2V instead of Tora
    theta: float = 10000.0


@dataclass
class PatchEmbedParams:
    text_hidden_size: int = 4096


@dataclass
class AdaLNParams:
    qk_ln: bool = True
    qk_layernorm_epsilon: float = 1e-6


@dataclass
class FinalLayerParams:
    layernorm_epsilon: float = 1e-6


@dataclass
class DiTModules:
    pos_embed_config: Targeted[PosEmbedParams] = targeted(PosEmbedParams)
    patch_embed_config: Targeted[PatchEmbedParams] = targeted(PatchEmbedParams)
    adaln_layer_config: Targeted[AdaLNParams] = targeted(AdaLNParams)
    final_layer_config: Targeted[FinalLayerParams] = targeted(FinalLayerParams)


@dataclass
class TrajExtractorParams:
    """Trajectory extractor (official values were hard-coded in the DiT constructor)."""
    channels: int = 128  # feature width of every level
    num_res_blocks: int = 2  # ResNet blocks per level; one level per transformer layer
    latent_channels: int = 16  # motion latents come from the 16-channel VAE
    downscale: int = 2  # pixel-unshuffle factor: a copy of the DiT's patch_size (LINKED)


@dataclass
class FuserParams:
    """Motion-guidance fuser: h + GroupNorm(h) * gamma + beta."""
    num_groups: int = 32
    eps: float = 1e-5
    # Padding of the temporal Conv1d of gamma/beta at the first and last latent frame: "replicate"
    # (official) or "zeros".
    temporal_padding: str = "replicate"


@dataclass
class DiTParams:
    time_embed_dim: int = 512
    elementwise_affine: bool = True
    num_frames: int = 49
    time_compressed_rate: int = 4
    latent_width: int = 90
    latent_height: int = 60
    num_layers: int = 42
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 3072
    adm_in_channels: Optional[int] = 256  # IGNORED (no class conditioning)
    num_attention_heads: int = 48
    transformer_args: TransformerArgs = field(default_factory=TransformerArgs)
    modules: DiTModules = field(default_factory=DiTModules)
    traj_extractor: TrajExtractorParams = field(default_factory=TrajExtractorParams)
    fuser: FuserParams = field(default_factory=FuserParams)


# ----------------------------------------------------------------------------------------------
# Diffusion: discretisation, denoiser, sampler, guidance, loss
# ----------------------------------------------------------------------------------------------

@dataclass
class DiscretizationParams:
    linear_start: float = 0.00085
    linear_end: float = 0.012
    num_timesteps: int = 1000
    shift_scale: float = 1.0


@dataclass
class TargetOnly:
    target: Optional[str] = None


@dataclass
class DenoiserParams:
    num_idx: int = 1000
    quantize_c_noise: bool = False
    weighting_config: TargetOnly = field(default_factory=TargetOnly)
    scaling_config: TargetOnly = field(default_factory=TargetOnly)
    discretization_config: Targeted[DiscretizationParams] = targeted(DiscretizationParams)


@dataclass
class GuiderParams:
    scale: float = 6.0
    exp: float = 5.0
    num_steps: int = 50  # a copy of the sampler's num_steps (LINKED)
    # The official sampler feeds DynamicCFG the DDPM timestep instead of the step index, which makes
    # the scale jump pseudo-randomly in [1, 7] (THUDM calls it deliberate).  "timestep" = official.
    step_input: str = "timestep"


@dataclass
class SamplerParams:
    num_steps: int = 50
    verbose: bool = True
    # Official: every middle step draws a Gaussian for a first-order proposal and throws it away.
    # False skips that draw (same distribution, a different random stream than the official code).
    draw_discarded_noise: bool = True
    discretization_config: Targeted[DiscretizationParams] = targeted(DiscretizationParams)
    guider_config: Targeted[GuiderParams] = targeted(GuiderParams)


@dataclass
class SigmaSamplerParams:
    uniform_sampling: bool = True
    num_idx: int = 1000
    discretization_config: Targeted[DiscretizationParams] = targeted(DiscretizationParams)


@dataclass
class LossParams:
    offset_noise_level: float = 0.0
    sigma_sampler_config: Targeted[SigmaSamplerParams] = targeted(SigmaSamplerParams)


# ----------------------------------------------------------------------------------------------
# Text encoder and VAE
# ----------------------------------------------------------------------------------------------

@dataclass
class T5Params:
    model_dir: str = "ckpts/t5-v1_1-xxl"
    # Official: the tokenizer files sit in model_dir.  huggingface THUDM/CogVideoX-5b keeps them in
    # a separate 'tokenizer' subfolder: point this at it (None = model_dir).
    tokenizer_dir: Optional[str] = None
    max_length: int = 226  # tokens: truncated to 225 + EOS, padded; the DiT's text length


@dataclass
class EmbedderConfig:
    target: Optional[str] = None
    is_trainable: bool = False
    input_key: str = "txt"
    ucg_rate: float = 0.1
    params: T5Params = field(default_factory=T5Params)


@dataclass
class ConditionerParams:
    emb_models: List[EmbedderConfig] = field(default_factory=lambda: [EmbedderConfig()])


@dataclass
class VAECoderParams:
    double_z: bool = True
    z_channels: int = 16
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: List[int] = field(default_factory=lambda: [1, 2, 2, 4])
    attn_resolutions: List[int] = field(default_factory=list)
    num_res_blocks: int = 3
    dropout: float = 0.0
    gather_norm: bool = True  # only gathers group-norm statistics across context-parallel ranks
    # Time is halved by the down-samplers of the first log2(temporal_compress_times) levels (and
    # doubled by as many up-samplers); official constructor default, absent from the yaml.
    temporal_compress_times: int = 4


@dataclass
class VAEParams:
    cp_size: int = 1
    ckpt_path: Optional[str] = "ckpts/vae/3d-vae.pt"
    ignore_keys: List[str] = field(default_factory=lambda: ["loss"])
    loss_config: TargetOnly = field(default_factory=TargetOnly)
    regularizer_config: TargetOnly = field(default_factory=TargetOnly)
    encoder_config: Targeted[VAECoderParams] = targeted(VAECoderParams)
    decoder_config: Targeted[VAECoderParams] = field(default_factory=lambda: Targeted[VAECoderParams](
        params=VAECoderParams(gather_norm=False)))
    # Temporal chunks of the decoder (tora.vae.chunk_spans), linked by the causal-conv cache.  The
    # official sample_video.py decodes latent frames [0:3], [3:5], [5:7], ...: chunks of 2 whose first
    # one also takes the remainder (odd T: 3).  Even, or 0 = all latent frames in one call.  The group
    # norms see one chunk at a time, so the chunking is part of the numerics.
    decode_chunk_latent_frames: int = 2
    # Spatial tiling of the decoder, in latent pixels (memory saver, not bit-identical: each tile has
    # its own group-norm statistics; overlapping tiles are blended linearly).  0 = no tiling.
    decode_tile_latent_size: int = 0
    decode_tile_overlap_latent: int = 4  # latent pixels shared by neighbouring tiles
    # Frames per encoder call, linked by the causal-conv cache.  0 = all frames in one call (official);
    # 8 = diffusers' batching (less memory, different group-norm statistics).  A multiple of
    # temporal_compress_times.
    encode_chunk_frames: int = 0
    # Videos per encoder call (official 1: one at a time).  Larger batches are faster for small
    # models and give the same latents (the group norms are per sample); more memory.
    encode_batch_size: int = 1
    # When the one-pass encode runs out of GPU memory, retry in chunks of this many frames (0: fail).
    encode_fallback_chunk_frames: int = 8
    # Spatial tiling of the encoder, in latent pixels (x8 video pixels), as for the decoder: a memory
    # saver for small cards; not bit-identical (per-tile group norms, blended moments).  0 = no tiling.
    encode_tile_latent_size: int = 0
    encode_tile_overlap_latent: int = 4


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------

@dataclass
class MotionConfig:
    """How motion (trajectory) conditioning is prepared and cached."""
    # Cache across denoising steps: "modulation" = extractor output and every layer's gamma/beta
    # (fastest; 2 x layers x tokens x hidden extra memory), "features" = extractor output only,
    # "none" = recompute every step (the official behaviour).  "auto" picks "modulation" when it fits.
    cache: str = "auto"
    cache_budget_gib: float = 20.0  # "auto" caches gamma/beta only below this size ...
    activation_headroom_gib: float = 8.0  # ... and only if this much GPU memory stays free besides
    # Official: the conditional and unconditional CFG halves get separate VAE posterior samples of
    # the motion video.  False shares one sample (half the extractor/fuser work).
    separate_cfg_samples: bool = True


@dataclass
class ModelConfig:
    scale_factor: float = 0.7
    disable_first_stage_autocast: bool = True
    log_keys: List[str] = field(default_factory=lambda: ["txt"])
    en_and_decode_n_samples_a_time: int = 1
    # I2V
    noised_image_input: bool = False
    noised_image_dropout: float = 0.05
    noised_image_all_concat: bool = False
    latent_input: bool = False
    # Training: regexes on module names of the DiT that get gradients.
    trainable_modules: List[str] = field(default_factory=lambda: ["fuser", "traj_extractor"])
    network_config: Targeted[DiTParams] = targeted(DiTParams)
    denoiser_config: Targeted[DenoiserParams] = targeted(DenoiserParams)
    sampler_config: Targeted[SamplerParams] = targeted(SamplerParams)
    loss_fn_config: Targeted[LossParams] = targeted(LossParams)
    conditioner_config: Targeted[ConditionerParams] = targeted(ConditionerParams)
    first_stage_config: Targeted[VAEParams] = targeted(VAEParams)
    motion: MotionConfig = field(default_factory=MotionConfig)


@dataclass
class TrajectoryConfig:
    """Trajectory point files -> sparse flow (see tora.trajectory)."""
    canvas_width: int = 256  # point files are drawn on this canvas (official: 256 x 256)
    canvas_height: int = 256
    blur_kernel_size: int = 99
    blur_sigma: float = 10.0
    # Points outside the canvas: "error" (default) or "clamp" (with a warning).
    out_of_canvas: str = "error"
    # Point files -> one point per frame.  "spread": <=F points as officially (equal points per
    # segment), >F points sub-sampled evenly over the whole file; "official": the official rule,
    # which truncates files of >F points (F < n < 2F: only the first F used; warned);
    # "uniform": constant speed along the path.
    resample: str = "spread"
    # Border of the blur: "reflect101" = cv2.filter2D as in official sampling; the official
    # training blurred with "zeros" (OFFICIAL_QUIRKS.md#blur-and-colour-mismatch).
    blur_border: str = "reflect101"
    # flow_to_image normalises colours over chunks of this many frames: 0 = all frames together
    # (official sampling); the official training used 2.
    flow_image_chunk_frames: int = 0


@dataclass
class FarnebackConfig:
    """OpenCV ``calcOpticalFlowFarneback`` settings (``motion_from_video.flow_estimator: farneback``)."""
    pyr_scale: float = 0.5  # image scale between pyramid levels
    levels: int = 3  # pyramid levels
    # averaging window (pixels): larger follows faster motion and fills the flat inside of shapes
    # (15 recovers an 8-px disc's motion at its centre within 0.2 px; 9 sees almost none), blurs edges
    winsize: int = 15
    iterations: int = 3  # iterations per level
    poly_n: int = 5  # pixel neighbourhood of the polynomial expansion
    poly_sigma: float = 1.1  # Gaussian sigma of that expansion (1.1 for poly_n 5)
    threads: int = 8  # frame pairs computed in parallel


@dataclass
class MotionFromVideoConfig:
    """Training motion from real videos: optical flow (RAFT, or Farneback without weights), dense or
    tracked sparse (see tora.tracking)."""
    # "raft" (official): torchvision RAFT with local weights; "farneback": OpenCV, no weights.
    flow_estimator: str = "raft"
    farneback: FarnebackConfig = field(default_factory=FarnebackConfig)
    # torchvision RAFT variant: "raft_large" (official) or "raft_small" (about 3x faster, coarser).
    raft_model: str = "raft_large"
    # Local RAFT state dict (official: Raft_Large_Weights.DEFAULT, downloaded at start); its URL is
    # named in the error when the file is missing.  Must match raft_model.
    raft_weights: str = "ckpts/raft/raft_large_C_T_SKHT_V2-ff5fadd5.pth"
    raft_iterations: int = 12  # RAFT num_flow_updates; the last estimate is used (official 12)
    # Frame pairs per RAFT call: memory/speed only, eval-mode RAFT treats pairs independently
    # (official: max(B*F/20, 1) = 2).
    raft_batch_pairs: int = 2
    # "dense" (official sample_flow false): every flow; "sparse": flow along tracked keypoints;
    # "none": no motion conditioning (the plain text-to-video base, stage 0 of a model from scratch).
    stage: str = "dense"
    grid_stride: int = 32  # one keypoint candidate per stride x stride cell (official 32)
    min_points: int = 1  # keypoints per clip drawn uniformly in [min_points, max_points] (official 1..16)
    max_points: int = 16
    # "official": move by the integer-truncated flow at the point's pixel (points slower than
    # 1 px/frame never move); "subpixel": bilinear flow at sub-pixel positions.
    tracking: str = "official"


@dataclass
class DataParams:
    """Fine-tuning clips (see tora.data); official names and values of the train yaml."""
    video_size: List[int] = field(default_factory=lambda: [480, 720])  # [height, width] after crop
    fps: float = 8.0  # target frame rate of the sampled frames (the integer step can exceed it)
    max_num_frames: int = 49  # frames per item (4k+1 for the VAE); shorter runs are padded
    skip_frms_num: float = 3.0  # frames ignored at both ends (transitions); whole (yaml: "3.")
    # Short clips give their longest 4k+1 run of frames, padded with the last one; a clip giving
    # fewer frames than this is replaced (official: 1, i.e. any frame left; larger values avoid
    # items that are mostly frozen padding).
    min_num_frames: int = 1
    # An unreadable or too-short clip is replaced by other clips; the item is an error once this
    # many replacements failed as well (the official dataset retried forever).
    max_retries: int = 10


@dataclass
class StepCacheConfig:
    """First-block step cache (tora.acceleration.FirstBlockCache); changes the output slightly."""
    enabled: bool = False
    threshold: float = 0.08  # relative change of layer 0's residual below which a step reuses the rest
    warmup_steps: int = 3  # always compute the first steps fully
    max_consecutive_skips: int = 3


@dataclass
class AccelerationConfig:
    """Opt-in speed modes (tora.acceleration); the defaults compute exactly the official function."""
    compile: bool = False  # regional torch.compile of the layers' elementwise hot paths
    fp8: bool = False  # fp8 (e4m3) matmuls in the transformer layers (Hopper GPUs)
    cfg_parallel: bool = False  # conditional/unconditional halves on two GPUs (pairs of ranks)
    sdpa_backend: str = "auto"  # auto | cudnn | flash | efficient | math
    step_cache: StepCacheConfig = field(default_factory=StepCacheConfig)


@dataclass
class ArgsConfig:
    """Run settings of the entry scripts (official ``args:`` section).  Every command-line flag of
    sample_video.py / train_video.py sets one of these; the command line beats the YAML files."""
    mode: str = "inference"  # inference | finetune
    load: Optional[str] = None  # DiT checkpoint: folder with 'latest' or mp_rank_00_model_states.pt
    seed: int = 1234  # sample i of a run uses seed + i (independent of the number of GPUs)
    device: Optional[str] = None  # default: this rank's GPU when there is one, else the CPU
    dtype: str = "auto"  # auto = bf16 on GPU (as released), fp32 on CPU
    bf16: Optional[bool] = None  # official key: true means dtype bf16
    # none: all on the device; model: T5/VAE and DiT never share the GPU (official); sequential: also
    # stream the DiT and T5 layer by layer (least memory, slower)
    offload: str = "model"
    # -- sampling ------------------------------------------------------------------------------
    input_type: str = "txt"  # txt: --input-file; cli: prompts typed on stdin
    input_file: Optional[str] = None  # one prompt per line; I2V: prompt@@image_name
    output_dir: str = "samples"
    point_path: List[str] = field(default_factory=list)  # trajectory files, one object each
    no_flow_injection: bool = False  # sample without trajectories even when point files are given
    image2video: bool = False
    img_dir: Optional[str] = None  # where I2V image names are looked up (default: next to the prompts)
    image_resize: str = "stretch"  # official: stretch to the video size; crop: keep aspect, centre crop
    sampling_num_frames: Optional[int] = None  # latent frames (official 13); default: the model's
    sampling_fps: int = 8  # frame rate of the written videos
    video_crf: int = 18  # libx264 quality of the written videos (official 18)
    save_latents: bool = False  # also write the sampled latents (latents/<name>.safetensors)
    # Official keys, only the official value (IGNORED)
    batch_size: int = 1
    latent_channels: int = 16
    force_inference: bool = True
    flow_from_prompt: bool = False
    # -- training (train_video.py; official train_*.yaml names and values) ----------------------
    experiment_name: str = "tora"  # run folder: <save>/<experiment_name>-MM-DD-HH-MM-SS[-k] (new, unique)
    save: str = "outputs/train"  # parent folder of the run folders
    resume: Optional[str] = None  # a run folder: continue it from its 'latest' checkpoint
    # Keep what is a function of the clip alone, per clip, for the rest of the run (device memory):
    # its VAE posterior moments, the dense stage's motion-video moments, the sparse stage's flows.
    # Exact only when every item of a clip is the same (the whole clip: data.params.max_num_frames =
    # the clip's frames at its frame rate, skip_frms_num 0), e.g. the synthetic clips; the posterior is
    # still sampled every step.  Off officially (random windows of long clips).
    cache_latents: bool = False
    # Train from the constructor's initialisation: then args.load must be null (and vice versa).
    from_scratch: bool = False
    # Load a text-to-video checkpoint (16 input channels) into an image-to-video model (32): the
    # patch embedding's image-latent half starts at zero, so the I2V model starts as the T2V one.
    expand_input_channels: bool = False
    train_iters: int = 15000  # optimizer steps
    train_data: List[str] = field(default_factory=lambda: ["training_examples"])  # SFT data folders
    num_workers: int = 8  # DataLoader worker processes per rank
    save_interval: int = 2000  # a checkpoint every N iterations (and at the end)
    keep_last_checkpoints: int = 0  # delete older checkpoints, keeping the last N (0 = keep all)
    log_interval: int = 1  # a log line every N iterations (metrics.jsonl gets every step)
    tensorboard: bool = False  # TensorBoard events in <run>/tensorboard
    # Recompute each DiT layer in the backward pass (memory).  The one place of the setting; None =
    # the model config's transformer_args.checkpoint_activations (official model yaml: true).
    checkpoint_activations: Optional[bool] = None
    warmup: float = 0.01  # linear warmup over this fraction of train_iters (SAT AnnealingLR)
    lr_decay_style: str = "linear"  # after warmup: linear | cosine | exponential | constant
    lr_decay_iters: Optional[int] = None  # length of the decay (default: train_iters)
    lr_decay_ratio: float = 0.1  # cosine: final lr = ratio * lr
    # SAT finetune mode: the first N steps run at min(auto_warmup_rate * lr, warmup lr).
    auto_warmup_steps: int = 100
    auto_warmup_rate: float = 0.05
    ema_decay: float = 0.0  # > 0: EMA of the trainable weights, saved as <iter>-ema (official 0.9999)
    exit_interval: Optional[int] = None  # stop (after saving, if due) at a multiple of N iterations
    model_parallel_size: int = 1  # only 1
    # Official keys without effect here (IGNORED: no evaluation during training).
    force_train: bool = True
    no_load_rng: bool = True
    only_log_video_latents: bool = True
    eval_iters: int = 1
    eval_interval: Optional[int] = None
    eval_batch_size: int = 1
    valid_data: Optional[List[str]] = None
    split: str = "1,0,0"


@dataclass
class ToraConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    motion_from_video: MotionFromVideoConfig = field(default_factory=MotionFromVideoConfig)
    args: ArgsConfig = field(default_factory=ArgsConfig)  # run settings of the entry scripts
    acceleration: AccelerationConfig = field(default_factory=AccelerationConfig)
    data: Targeted[DataParams] = targeted(DataParams)  # fine-tuning clips
    deepspeed: Any = field(default_factory=dict)  # passed to DeepSpeed as is


# ----------------------------------------------------------------------------------------------
# Accepted ``target`` values: the official class paths and this project's names.
# ----------------------------------------------------------------------------------------------

TARGETS = {
    "model.network_config": ["dit_video_concat.DiffusionTransformer", "tora.dit.DiffusionTransformer"],
    "model.network_config.params.modules.pos_embed_config": [
        "dit_video_concat.Rotary3DPositionEmbeddingMixin", "tora.dit.Rotary3DPositionEmbeddingMixin"],
    "model.network_config.params.modules.patch_embed_config": [
        "dit_video_concat.ImagePatchEmbeddingMixin", "tora.dit.ImagePatchEmbeddingMixin"],
    "model.network_config.params.modules.adaln_layer_config": [
        "dit_video_concat.AdaLNMixin", "tora.dit.AdaLNMixin"],
    "model.network_config.params.modules.final_layer_config": [
        "dit_video_concat.FinalLayerMixin", "tora.dit.FinalLayerMixin"],
    "*.discretization_config": [
        "sgm.modules.diffusionmodules.discretizer.ZeroSNRDDPMDiscretization",
        "tora.diffusion.ZeroSNRDDPMDiscretization"],
    "model.denoiser_config": ["sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
                              "tora.diffusion.DiscreteDenoiser"],
    "model.denoiser_config.params.weighting_config": [
        "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"],  # unused by the video loss
    "model.denoiser_config.params.scaling_config": [
        "sgm.modules.diffusionmodules.denoiser_scaling.VideoScaling"],  # tora.diffusion.video_scaling
    "model.sampler_config": ["sgm.modules.diffusionmodules.sampling.VPSDEDPMPP2MSampler",
                             "tora.diffusion.VPSDEDPMPP2MSampler"],
    "model.sampler_config.params.guider_config": [
        "sgm.modules.diffusionmodules.guiders.DynamicCFG", "tora.diffusion.DynamicCFG",
        "sgm.modules.diffusionmodules.guiders.VanillaCFG", "tora.diffusion.VanillaCFG"],
    "model.loss_fn_config": ["sgm.modules.diffusionmodules.loss.VideoDiffusionLoss",
                             "tora.diffusion.VideoDiffusionLoss"],
    "model.loss_fn_config.params.sigma_sampler_config": [
        "sgm.modules.diffusionmodules.sigma_sampling.DiscreteSampling", "tora.diffusion.DiscreteSampling"],
    "model.conditioner_config": ["sgm.modules.GeneralConditioner", "tora.text.GeneralConditioner"],
    "model.conditioner_config.params.emb_models": [
        "sgm.modules.encoders.modules.FrozenT5Embedder", "tora.text.FrozenT5Embedder"],
    "model.first_stage_config": ["vae_modules.autoencoder.VideoAutoencoderInferenceWrapper",
                                 "tora.vae.VideoAutoencoder"],
    "model.first_stage_config.params.encoder_config": [
        "vae_modules.cp_enc_dec.ContextParallelEncoder3D"],
    "model.first_stage_config.params.decoder_config": [
        "vae_modules.cp_enc_dec.ContextParallelDecoder3D"],
    "model.first_stage_config.params.loss_config": ["torch.nn.Identity"],
    "model.first_stage_config.params.regularizer_config": [
        "vae_modules.regularizers.DiagonalGaussianRegularizer", "tora.vae.Posterior"],
    "data": ["data_video.SFTDataset", "tora.data.SFTDataset"],
}

CHOICES = {
    "model.network_config.params.transformer_args.layernorm_order": ["pre"],
    "model.network_config.params.fuser.temporal_padding": ["replicate", "zeros"],
    "model.sampler_config.params.guider_config.params.step_input": ["timestep", "step_index"],
    "model.motion.cache": ["auto", "modulation", "features", "none"],
    "trajectory.out_of_canvas": ["error", "clamp"],
    "args.mode": ["inference", "finetune"],
    "args.dtype": ["auto", "bf16", "fp32"],
    "args.offload": ["none", "model", "sequential"],
    "acceleration.sdpa_backend": ["auto", "cudnn", "flash", "efficient", "math"],
    "args.input_type": ["txt", "cli"],
    "args.image_resize": ["stretch", "crop"],
    "trajectory.resample": ["spread", "official", "uniform"],
    "trajectory.blur_border": ["reflect101", "zeros"],
    "motion_from_video.raft_model": ["raft_large", "raft_small"],
    "motion_from_video.stage": ["dense", "sparse", "none"],
    "motion_from_video.flow_estimator": ["raft", "farneback"],
    "motion_from_video.tracking": ["official", "subpixel"],
    "args.lr_decay_style": ["linear", "cosine", "exponential", "constant"],
}


# ----------------------------------------------------------------------------------------------
# One value, one place: the copies the official YAML repeats
# ----------------------------------------------------------------------------------------------

# (the one place, a copy).  A pair of nodes links every leaf below them.  After all sources are
# merged (files in order, program defaults, command line), for each pair that differs:
#   * a side that is None (not given), or a copy that no source set, takes the other value;
#   * the one place set by a later source than the copy: the copy follows it, with a note in the log
#     (so `model.sampler_config.params.num_steps=30` on the command line also moves the guider);
#   * otherwise (the copy set as late or later, to another value): a ConfigError naming both keys,
#     both values and the source of each.  Official files repeat equal values and load unchanged.
LINKED = (
    ("model.sampler_config.params.num_steps", "model.sampler_config.params.guider_config.params.num_steps"),
    ("model.denoiser_config.params.discretization_config.params",
     "model.sampler_config.params.discretization_config.params"),
    ("model.denoiser_config.params.discretization_config.params",
     "model.loss_fn_config.params.sigma_sampler_config.params.discretization_config.params"),
    ("model.network_config.params.num_layers", "model.network_config.params.transformer_args.num_layers"),
    ("model.network_config.params.hidden_size", "model.network_config.params.transformer_args.hidden_size"),
    ("model.network_config.params.num_attention_heads",
     "model.network_config.params.transformer_args.num_attention_heads"),
    ("model.network_config.params.patch_size", "model.network_config.params.traj_extractor.downscale"),
    ("args.checkpoint_activations", "model.network_config.params.transformer_args.checkpoint_activations"),
)


# ----------------------------------------------------------------------------------------------
# Official keys accepted without effect (docs/OFFICIAL_QUIRKS.md lists them too)
# ----------------------------------------------------------------------------------------------

ANY = None  # every value is accepted (and none changes anything)

# key -> (accepted values, why the key does nothing here).  A value outside the accepted ones is a
# ConfigError saying so: a setting never validates and then does something else.
_NET = "model.network_config.params"
_VAE = "model.first_stage_config.params"
IGNORED = {
    "model.disable_first_stage_autocast": (
        (True,), "the VAE never runs under autocast (always in its own dtype)"),
    "model.log_keys": (
        ANY, "the official training logged sample videos of these batch keys; training here logs "
             "metrics.jsonl and TensorBoard scalars only"),
    "model.en_and_decode_n_samples_a_time": (
        (1,), "the VAE encodes and decodes one sample at a time, as officially"),
    f"{_NET}.adm_in_channels": (ANY, "CogVideoX has no class/vector conditioning (unused officially too)"),
    f"{_NET}.transformer_args.vocab_size": (
        ANY, "SAT's word-embedding table is deleted: the patch embedding replaces it"),
    f"{_NET}.transformer_args.model_parallel_size": ((1,), "no model parallelism"),
    f"{_NET}.transformer_args.parallel_output": (
        ANY, "filled in by the official code at run time; one model-parallel rank"),
    "model.denoiser_config.params.weighting_config": (
        ANY, "EpsWeighting: unused by the video loss (officially too)"),
    "model.sampler_config.params.verbose": ((True,), "rank 0 always shows the denoising progress bar"),
    f"{_VAE}.loss_config": (ANY, "the VAE is frozen: no VAE loss"),
    **{f"{_VAE}.{coder}_config.params.{key}": (ANY, why) for coder in ("encoder", "decoder") for key, why in (
        ("resolution", "declared by the official VAE config, unused officially too"),
        ("gather_norm", "gathers group-norm statistics across context-parallel ranks; cp_size is 1"))},
    "args.batch_size": ((1,), "one video per prompt and seed"),
    "args.latent_channels": ((16,), "the latent channels are the VAE's z_channels"),
    "args.flow_from_prompt": (
        (False,), "flow files named in the prompt file are not supported; give trajectories with --point_path"),
    "args.force_inference": (ANY, "DiT checkpoints always load strictly (a missing weight is an error)"),
    "args.force_train": (ANY, "which keys the starting weights may lack is fixed by tora.checkpoint"),
    "args.no_load_rng": (ANY, "random streams derive from args.seed and the step; no RNG state is loaded"),
    "args.only_log_video_latents": (ANY, "no videos are logged during training"),
    "args.model_parallel_size": ((1,), "no model parallelism"),
    **{f"args.{key}": (ANY, "no evaluation during training (officially effectively off)")
       for key in ("eval_iters", "eval_interval", "eval_batch_size", "valid_data", "split")},
}


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _describe(err: OmegaConfBaseException, source: str) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).split("\n")[0]
    if "not in" in msg and key:
        return f"unknown config key '{key}' (in {source})"
    if key:
        return f"invalid value for '{key}' (in {source}): {msg}"
    return f"invalid config (in {source}): {msg}"


OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]]*=")  # a command-line token key.path=value
KEY_PATH = re.compile(r"^[A-Za-z_]\w*(\.\w+)+$")  # a token that looks like key.path without '=value'


def parse_cli(parser, argv=None):
    """``parser.parse_args`` where ``key=value`` config overrides may stand anywhere on the line (also
    after a list flag such as ``--point_path a.txt b.txt``); they end up in ``options.overrides``.

    Any other stray token (``args.seed 99``, a file after the wrong flag) is an error naming it:
    dropping it would run with a setting the user did not ask for.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    options = parser.parse_args([t for t in argv if not OVERRIDE.match(t)])
    stray = list(getattr(options, "overrides", None) or [])
    if stray:
        parser.error(_stray_token_message(stray))
    options.overrides = [t for t in argv if OVERRIDE.match(t)]
    return options


def _stray_token_message(stray: list[str]) -> str:
    token = stray[0]
    message = (f"unexpected argument {token!r}: config overrides are written key=value (e.g. args.seed=99) "
               f"and a flag's values follow the flag directly (e.g. --point_path a.txt b.txt)")
    if KEY_PATH.match(token) and len(stray) > 1:
        message += f"; did you mean '{token}={stray[1]}'?"
    return message


def schema() -> DictConfig:
    cfg = OmegaConf.structured(ToraConfig)
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_struct(cfg.deepspeed, False)  # DeepSpeed's own config: any keys, checked by DeepSpeed
    return cfg


def merge(cfg: DictConfig, update: DictConfig | dict, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, update)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, source)) from None


def load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError carries the line number
        raise ConfigError(f"cannot parse config file {path}: {err}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _dotlist(overrides: list[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"command-line override must look like key.path=value, got {bad[0]!r}")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as err:  # a YAML syntax error in a value
        raise ConfigError(f"cannot parse command-line overrides {list(overrides)}: {err}") from None


def load_config(files: list[str | Path] = (), overrides: list[str] = (),
                extra: dict | None = None) -> DictConfig:
    """Merge ``files`` (in order), ``extra`` (program defaults) and dotlist ``overrides`` onto the
    schema, resolve the LINKED copies and validate."""
    layers = [(str(path), load_yaml(path)) for path in files]
    if extra:
        layers.append(("program defaults", OmegaConf.create(extra)))
    if overrides:
        # keys through a list item (a.0.b=v) are set one by one after the merge: in a dotlist the
        # "0" would become a mapping key
        indexed = [o for o in overrides if "=" in o and re.search(r"(^|\.)\d+(\.|$)", o.split("=", 1)[0])]
        layers.append(("command line", _dotlist([o for o in overrides if o not in indexed])))
        return _load(layers, [_item_override(o) for o in indexed])
    return _load(layers)


def _item_override(token: str) -> tuple[str, Any]:
    key, value = token.split("=", 1)
    try:
        return key, OmegaConf.from_dotlist([f"v={value}"]).v
    except Exception as err:  # a YAML syntax error in a value
        raise ConfigError(f"cannot parse command-line override {token!r}: {err}") from None


def _load(layers: list[tuple[str, DictConfig]], item_overrides: list[tuple[str, Any]] = ()) -> DictConfig:
    """layers: (source name, mapping) in increasing precedence -> merged, linked, validated config;
    item_overrides: (key path through a list item, value) from the command line, applied last."""
    cfg = schema()
    for source, update in layers:
        cfg = merge(cfg, update, source)
    for key, value in item_overrides:
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except (OmegaConfBaseException, IndexError, KeyError) as err:
            raise ConfigError(f"invalid command-line override '{key}': {str(err).splitlines()[0]}") from None
    link(cfg, layers)
    validate(cfg)
    return cfg


_UNSET = object()


def _last_setter(layers, key: str) -> int:
    """Index of the last layer that sets ``key`` (-1: none, the schema default)."""
    for index in reversed(range(len(layers))):
        try:
            if OmegaConf.select(layers[index][1], key, default=_UNSET) is not _UNSET:
                return index
        except OmegaConfBaseException:  # e.g. a scalar where the key path needs a mapping
            continue
    return -1


def _leaf_pairs(cfg: DictConfig, one: str, copy: str):
    """(one, copy) key paths of every leaf under a LINKED pair (the pair itself for leaves)."""
    node = OmegaConf.select(cfg, one)
    if not isinstance(node, DictConfig):
        yield one, copy
        return
    for key in node:
        yield from _leaf_pairs(cfg, f"{one}.{key}", f"{copy}.{key}")


def link(cfg: DictConfig, layers: list[tuple[str, DictConfig]]) -> None:
    """Give every LINKED copy the value of its one place (rules at LINKED), in place."""
    def source(index):
        return layers[index][0] if index >= 0 else "schema default"
    for pair in LINKED:
        for one, copy in _leaf_pairs(cfg, *pair):
            one_value, copy_value = OmegaConf.select(cfg, one), OmegaConf.select(cfg, copy)
            if one_value == copy_value:
                continue
            one_at, copy_at = _last_setter(layers, one), _last_setter(layers, copy)
            if one_value is None:
                OmegaConf.update(cfg, one, copy_value)
                continue
            if copy_value is not None and copy_at >= 0 and copy_at >= one_at:
                raise ConfigError(
                    f"'{copy}' = {copy_value!r} (in {source(copy_at)}) disagrees with '{one}' = "
                    f"{one_value!r} (in {source(one_at)}): the first is a copy of the second, set only '{one}'")
            if copy_at >= 0:
                logger.info("note: '%s' follows '%s' = %r (in %s); %r (in %s) is not used",
                            copy, one, one_value, source(one_at), copy_value, source(copy_at))
            OmegaConf.update(cfg, copy, one_value)


def _targets(node, path=""):
    """Yield (owner path, target) for every ``target`` key; list items share their list's path."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "target":
                if value is not None:
                    yield path, value
            else:
                yield from _targets(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for item in node:
            yield from _targets(item, path)


def _allowed_targets(owner: str):
    for pattern, allowed in TARGETS.items():
        if owner == pattern or (pattern.startswith("*") and owner.endswith(pattern[1:])):
            return allowed
    return []


def validate(cfg: DictConfig) -> None:
    for owner, value in _targets(OmegaConf.to_container(cfg)):
        allowed = _allowed_targets(owner)
        if value not in allowed:
            raise ConfigError(f"unsupported target '{value}' at '{owner}.target'; accepted: "
                              f"{', '.join(allowed) or '(no target key here)'}")
    for path, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, path)
        if value not in allowed:
            raise ConfigError(f"invalid value {value!r} for '{path}'; choose one of {allowed}")
    for key, (accepted, why) in IGNORED.items():
        value = OmegaConf.select(cfg, key)
        if accepted is not ANY and value not in accepted:
            raise ConfigError(f"'{key}' = {value!r} would have no effect: {why} (accepted: "
                              f"{', '.join(repr(v) for v in accepted)})")
    p = cfg.model.network_config.params
    if p.hidden_size % p.num_attention_heads:
        raise ConfigError(f"hidden_size {p.hidden_size} is not divisible by num_attention_heads "
                          f"{p.num_attention_heads} (model.network_config.params)")
    head = p.modules.pos_embed_config.params.hidden_size_head
    if head * p.num_attention_heads != p.hidden_size:
        raise ConfigError(f"'model.network_config.params.modules.pos_embed_config.params.hidden_size_head'"
                          f" = {head}, but hidden_size/num_attention_heads = "
                          f"{p.hidden_size // p.num_attention_heads}")
    if head % 8:
        raise ConfigError(f"hidden_size_head {head} must be a multiple of 8 for the 3-D rotary split")
    if (p.num_frames - 1) % p.time_compressed_rate:
        raise ConfigError(f"num_frames {p.num_frames} must be 1 + k * time_compressed_rate "
                          f"({p.time_compressed_rate}) (model.network_config.params)")


def network_params_from(params: dict, source: str = "network_config.params") -> DictConfig:
    """Validated DiT params from a plain ``network_config.params`` mapping (e.g. a dumped config)."""
    return _load([(source, OmegaConf.create({"model": {"network_config": {"params": params}}}))]
                 ).model.network_config.params
