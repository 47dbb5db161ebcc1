"""Tora weights in diffusers format: the SAT <-> diffusers key mapping, config.json, folders, conversion.

Two formats hold the same DiT:

* SAT container (what the official SAT code and this project train and sample with):
  ``mp_rank_00_model_states.pt`` = ``torch.save({"module": {"model.diffusion_model.<sat key>": tensor}})``
  (see :mod:`tora.checkpoint`);
* diffusers folder (what the official diffusers port ``ToraTransformer3DModel`` and diffusers'
  ``CogVideoXTransformer3DModel`` load): ``transformer/config.json`` + ``diffusion_pytorch_model.safetensors``
  (or ``-0000k-of-0000n`` shards + ``.index.json``), next to ``vae/``, ``text_encoder/``, ``tokenizer/``.

:data:`RULES` is the one mapping table; both directions are read from it.  It is diffusers' CogVideoX
table (``convert_cogvideox_to_diffusers.py``) plus Tora's motion modules under the official port's names
(``fuser.{i}`` for SAT's ``mixins.adaln_layer.fuser_list.{i}``; ``traj_extractor`` unchanged).  Two SAT
tensors are split: ``query_key_value`` [3D, D] -> ``to_q/to_k/to_v`` [D, D] each, and the 12-way adaLN
linear [12D, E] -> ``norm1.linear`` (video + text attention rows) and ``norm2.linear`` (MLP rows), 6D each.

Image-to-video is the natural extension: the same class with ``in_channels: 32`` (16 noisy + 16 image
latent channels; patch conv weight [D, 32, 2, 2]).

Decisions where the two official implementations differ (README "Weights"; OFFICIAL_QUIRKS.md#diffusers-format):

* **Learned position table (I2V).**  SAT's I2V checkpoint holds ``mixins.pos_embed.pos_embedding``, which
  Tora's SAT code never adds.  Converted Tora-faithfully it is dropped and ``use_learned_positional_embeddings``
  is false, so the diffusers model computes what Tora computes.  ``learned_pos_embedding=True`` keeps it as
  ``patch_embed.pos_embedding`` with ``use_learned_positional_embeddings: true`` (diffusers' CogVideoX-I2V
  convention, lossless for that tensor, but that diffusers model then ADDS it).  Back to SAT the table is
  read from the folder when present, else written as zeros (the official SAT I2V config declares it).
  Loaded into this project's DiT it is never added unless ``pos_embed_config.params.add_learnable_pos_embed``.
* **Final norm epsilon.**  diffusers' ``norm_out.norm`` uses ``norm_eps`` (1e-5), SAT's final layer 1e-6.
  This project keeps SAT's value (``final_layer_config.params.layernorm_epsilon``), whatever config.json
  says: the weights were trained with it; the difference to the diffusers port is ~2e-5 absolute.
* **Rotary positions off the configured grid.**  The official diffusers pipeline interpolates spatial
  positions over a crop of the ``sample_height x sample_width`` grid; SAT uses integer positions of the
  grid it is configured for.  This project keeps SAT's integer positions at every size (the rotary tables
  are buffers derived from the YAML's latent size; config.json's ``sample_*`` only feed the conversion).
* **I2V batch doubling.**  The official diffusers I2V pipeline re-doubles the motion latents for guidance
  inside its denoising loop, every step (a shape error at step 2).  That is pipeline code, not weights:
  this project's engine prepares both guidance halves' motion once per video, so a diffusers folder loaded
  here samples exactly like the SAT checkpoint it came from.

Not representable in diffusers and filled on the way back to SAT: the rotary tables (recomputed from the
config), SAT's unused absolute table ``transformer.position_embeddings.weight`` (zeros,
``max_sequence_length`` x D) and the I2V table above.

Memory: reading is lazy (``safe_open`` for names/shapes, one memory-mapped tensor at a time); writing
diffusers holds at most one shard of converted tensors; writing SAT keeps the merged qkv/adaLN tensors in
memory-mapped scratch files, so no second copy of the model is ever in RAM.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import (DIT_PREFIX, MODEL_FILE, CheckpointError, _group, atomic_torch_save, atomic_write_text,
                         check_keys, init_on_device)

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
TRANSFORMER_DIR = "transformer"
CLASS_TORA = "ToraTransformer3DModel"  # official diffusers port (motion modules included)
CLASS_COGVIDEOX = "CogVideoXTransformer3DModel"  # diffusers' CogVideoX: the base without motion modules
MOTION_PREFIXES_DIFFUSERS = ("traj_extractor.", "fuser.")
MOTION_PREFIXES_SAT = ("traj_extractor.", "mixins.adaln_layer.fuser_list.")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


class DiffusersFormatError(CheckpointError):
    """A diffusers folder that cannot be read as a Tora / CogVideoX transformer."""


# ----------------------------------------------------------------------------------------------
# The key mapping table (SAT keys without the ``model.diffusion_model.`` prefix)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """``sat`` <-> ``diffusers`` key templates; ``{i}`` a layer index, ``{p}`` weight|bias, ``{rest}`` any
    dotted tail.  ``op``: copy | qkv (SAT tensor = cat of 3 along dim 0) | adaln (see :func:`split`) |
    derived (SAT-only, recomputed or zero-filled) | pos_table (the I2V table, kept only on request)."""
    sat: str
    diffusers: tuple[str, ...]
    op: str = "copy"
    group: str = ""

    def match_sat(self, key: str) -> Optional[dict]:
        m = _regex(self.sat).match(key)
        return m.groupdict() if m else None

    def match_diffusers(self, key: str) -> Optional[tuple[int, dict]]:
        for index, template in enumerate(self.diffusers):
            m = _regex(template).match(key)
            if m:
                return index, m.groupdict()
        return None

    def sat_key(self, fields: dict) -> str:
        return self.sat.format(**fields)

    def diffusers_keys(self, fields: dict) -> list[str]:
        return [t.format(**fields) for t in self.diffusers]


@functools.lru_cache(maxsize=None)
def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile("^" + pattern.replace(r"\{rest\}", r"(?P<rest>.+)") + "$")


_BLOCK = "transformer_blocks.{i}."
RULES: tuple[Rule, ...] = (
    Rule("mixins.patch_embed.proj.{p}", ("patch_embed.proj.{p}",), group="patch embedding"),
    Rule("mixins.patch_embed.text_proj.{p}", ("patch_embed.text_proj.{p}",), group="patch embedding"),
    Rule("time_embed.0.{p}", ("time_embedding.linear_1.{p}",), group="time embedding"),
    Rule("time_embed.2.{p}", ("time_embedding.linear_2.{p}",), group="time embedding"),
    Rule("transformer.layers.{i}.input_layernorm.{p}", (_BLOCK + "norm1.norm.{p}",), group="blocks"),
    Rule("transformer.layers.{i}.attention.query_key_value.{p}",
         (_BLOCK + "attn1.to_q.{p}", _BLOCK + "attn1.to_k.{p}", _BLOCK + "attn1.to_v.{p}"), "qkv", "blocks"),
    Rule("transformer.layers.{i}.attention.dense.{p}", (_BLOCK + "attn1.to_out.0.{p}",), group="blocks"),
    Rule("transformer.layers.{i}.post_attention_layernorm.{p}", (_BLOCK + "norm2.norm.{p}",), group="blocks"),
    Rule("transformer.layers.{i}.mlp.dense_h_to_4h.{p}", (_BLOCK + "ff.net.0.proj.{p}",), group="blocks"),
    Rule("transformer.layers.{i}.mlp.dense_4h_to_h.{p}", (_BLOCK + "ff.net.2.{p}",), group="blocks"),
    Rule("mixins.adaln_layer.adaLN_modulations.{i}.1.{p}",
         (_BLOCK + "norm1.linear.{p}", _BLOCK + "norm2.linear.{p}"), "adaln", "blocks"),
    Rule("mixins.adaln_layer.query_layernorm_list.{i}.{p}", (_BLOCK + "attn1.norm_q.{p}",), group="blocks"),
    Rule("mixins.adaln_layer.key_layernorm_list.{i}.{p}", (_BLOCK + "attn1.norm_k.{p}",), group="blocks"),
    Rule("transformer.final_layernorm.{p}", ("norm_final.{p}",), group="final layer norm"),
    Rule("mixins.final_layer.norm_final.{p}", ("norm_out.norm.{p}",), group="output AdaLayerNorm"),
    Rule("mixins.final_layer.adaLN_modulation.1.{p}", ("norm_out.linear.{p}",), group="output AdaLayerNorm"),
    Rule("mixins.final_layer.linear.{p}", ("proj_out.{p}",), group="output projection"),
    Rule("mixins.adaln_layer.fuser_list.{i}.{rest}", ("fuser.{i}.{rest}",), group="motion-guidance fusers"),
    Rule("traj_extractor.{rest}", ("traj_extractor.{rest}",), group="trajectory extractor"),
    Rule("mixins.pos_embed.pos_embedding", ("patch_embed.pos_embedding",), "pos_table", "I2V learned table"),
    Rule("mixins.pos_embed.freqs_sin", (), "derived", "rotary tables (recomputed)"),
    Rule("mixins.pos_embed.freqs_cos", (), "derived", "rotary tables (recomputed)"),
    Rule("transformer.position_embeddings.weight", (), "derived", "SAT absolute table (unused)"),
)

# The 12 adaLN chunks of SAT (shift/scale/gate x msa/mlp x video/text) in diffusers' two linears.
_NORM1_CHUNKS, _NORM2_CHUNKS = (0, 1, 2, 6, 7, 8), (3, 4, 5, 9, 10, 11)


def find_sat_rule(key: str) -> Optional[tuple[Rule, dict]]:
    for rule in RULES:
        fields = rule.match_sat(key)
        if fields is not None:
            return rule, fields
    return None


def find_diffusers_rule(key: str) -> Optional[tuple[Rule, int, dict]]:
    for rule in RULES:
        found = rule.match_diffusers(key)
        if found is not None:
            return rule, found[0], found[1]
    return None


def diffusers_names(sat_key: str, learned_pos_embedding: bool = False) -> list[str]:
    """The diffusers keys a SAT key becomes ([] = dropped)."""
    found = find_sat_rule(sat_key)
    if found is None:
        return []
    rule, fields = found
    if rule.op == "derived" or (rule.op == "pos_table" and not learned_pos_embedding):
        return []
    return rule.diffusers_keys(fields)


def split(rule: Rule, tensor: torch.Tensor) -> list[torch.Tensor]:
    """One SAT tensor -> its diffusers tensors (views where possible)."""
    if rule.op == "qkv":
        return list(tensor.chunk(3, dim=0))
    if rule.op == "adaln":
        c = tensor.chunk(12, dim=0)
        return [torch.cat([c[j] for j in _NORM1_CHUNKS]), torch.cat([c[j] for j in _NORM2_CHUNKS])]
    return [tensor]


def merge(rule: Rule, parts: list[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Diffusers tensors -> the SAT tensor (inverse of :func:`split`); ``out`` may be preallocated."""
    if rule.op == "adaln":
        n1, n2 = parts[0].chunk(6, dim=0), parts[1].chunk(6, dim=0)
        parts = [*n1[:3], *n2[:3], *n1[3:], *n2[3:]]
    elif rule.op != "qkv":
        return parts[0]
    return torch.cat(parts, dim=0, out=out) if out is not None else torch.cat(parts, dim=0)


def merged_shape(rule: Rule, shapes: list[tuple]) -> tuple:
    if rule.op in ("qkv", "adaln"):
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return tuple(shapes[0])


# ----------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------

# config.json values of the architecture SAT implements (anything else is another model).
FIXED_CONFIG = {
    "activation_fn": "gelu-approximate", "attention_bias": True, "dropout": 0.0, "flip_sin_to_cos": True,
    "freq_shift": 0, "ofs_embed_dim": None, "patch_bias": True, "patch_size_t": None,
    "timestep_activation_fn": "silu", "use_rotary_positional_embeddings": True,
}
# Class defaults of CogVideoXTransformer3DModel that only its sin-cos (non-rotary) embedding reads.
INERT_CONFIG = {"spatial_interpolation_scale": 1.875, "temporal_interpolation_scale": 1.0}


# SAT settings config.json has no key for.  Written under EXTRA_KEY only where they differ from the schema
# defaults (= the official full-size values), so the official configs stay exactly as diffusers writes them;
# diffusers ignores keys starting with "_".
EXTRA_KEY = "_tora_sat_params"
EXTRA_PATHS = ("transformer_args.max_sequence_length", "modules.pos_embed_config.params.theta",
               "modules.adaln_layer_config.params.qk_ln", "modules.adaln_layer_config.params.qk_layernorm_epsilon",
               "modules.final_layer_config.params.layernorm_epsilon", "traj_extractor.channels",
               "traj_extractor.num_res_blocks", "traj_extractor.latent_channels", "traj_extractor.downscale",
               "fuser.num_groups", "fuser.eps", "fuser.temporal_padding")


@functools.lru_cache(maxsize=1)
def _default_network_params() -> DictConfig:
    from .config import schema

    return schema().model.network_config.params  # read only


def _extra_params(params: DictConfig) -> dict:
    defaults = _default_network_params()
    return {path: OmegaConf.select(params, path) for path in EXTRA_PATHS
            if OmegaConf.select(params, path) != OmegaConf.select(defaults, path)}


def _nested(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _deep_update(target: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value
    return target


def _diffusers_version() -> str:
    from importlib.metadata import version
    return version("diffusers")


def config_from_params(params: DictConfig, class_name: str = CLASS_TORA,
                       learned_pos_embedding: bool = False) -> dict:
    """config.json of the diffusers transformer for SAT ``model.network_config.params``."""
    pe = params.modules.pos_embed_config.params
    config = {
        "_class_name": class_name, "_diffusers_version": _diffusers_version(), **FIXED_CONFIG, **INERT_CONFIG,
        "attention_head_dim": params.hidden_size // params.num_attention_heads,
        "in_channels": params.in_channels, "max_text_seq_length": pe.text_length,
        "norm_elementwise_affine": params.elementwise_affine, "norm_eps": params.transformer_args.layernorm_epsilon,
        "num_attention_heads": params.num_attention_heads, "num_layers": params.num_layers,
        "out_channels": params.out_channels, "patch_size": params.patch_size, "sample_frames": params.num_frames,
        "sample_height": params.latent_height, "sample_width": params.latent_width,
        "temporal_compression_ratio": params.time_compressed_rate,
        "text_embed_dim": params.modules.patch_embed_config.params.text_hidden_size,
        "time_embed_dim": params.time_embed_dim, "use_learned_positional_embeddings": learned_pos_embedding,
    }
    extra = _extra_params(params)
    if extra:
        config[EXTRA_KEY] = extra
    return dict(sorted(config.items()))


def params_from_config(config: dict, source: str) -> DictConfig:
    """SAT ``network_config.params`` for a transformer config.json (validated; ``source`` names the file).

    What config.json cannot say comes from its ``_tora_sat_params`` (written by this project where it differs
    from the official values), else the schema defaults (trajectory extractor and fuser sizes, rotary theta,
    SAT's ``max_sequence_length``, the final-layer epsilon).  I2V (in_channels > out_channels) and
    a config with a learned table declare SAT's learnable table, as the official I2V config does.
    """
    from .config import network_params_from

    check_config(config, source)
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    learned = bool(config.get("use_learned_positional_embeddings"))
    params = {
        "time_embed_dim": config["time_embed_dim"], "elementwise_affine": config.get("norm_elementwise_affine", True),
        "num_frames": config["sample_frames"], "time_compressed_rate": config["temporal_compression_ratio"],
        "latent_width": config["sample_width"], "latent_height": config["sample_height"],
        "num_layers": config["num_layers"], "patch_size": config["patch_size"],
        "in_channels": config["in_channels"], "out_channels": config["out_channels"],
        "hidden_size": heads * head_dim, "num_attention_heads": heads,
        "transformer_args": {"layernorm_epsilon": config.get("norm_eps", 1e-5)},
        "modules": {
            "pos_embed_config": {"params": {
                "hidden_size_head": head_dim, "text_length": config["max_text_seq_length"],
                "learnable_pos_embed": learned or config["in_channels"] > config["out_channels"]}},
            "patch_embed_config": {"params": {"text_hidden_size": config["text_embed_dim"]}},
        },
    }
    extra = config.get(EXTRA_KEY, {})
    unknown = sorted(set(extra) - set(EXTRA_PATHS)) if isinstance(extra, dict) else [EXTRA_KEY]
    if unknown:
        raise DiffusersFormatError(f"{source}: {EXTRA_KEY} holds unknown setting(s) {unknown}; "
                                   f"known: {list(EXTRA_PATHS)}")
    return network_params_from(_deep_update(params, _nested(extra)), source)


REQUIRED_CONFIG = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "time_embed_dim",
                   "text_embed_dim", "num_layers", "sample_frames", "sample_height", "sample_width",
                   "patch_size", "temporal_compression_ratio", "max_text_seq_length")


def check_config(config: dict, source: str) -> None:
    """Refuse a config.json of another model, naming the offending keys."""
    name = config.get("_class_name")
    if name not in (CLASS_TORA, CLASS_COGVIDEOX):
        raise DiffusersFormatError(f"{source}: _class_name is {name!r}; expected {CLASS_TORA!r} (Tora) or "
                                   f"{CLASS_COGVIDEOX!r} (its CogVideoX base) - a checkpoint of another model?")
    missing = [k for k in REQUIRED_CONFIG if k not in config]
    if missing:
        raise DiffusersFormatError(f"{source}: missing config key(s) {missing}")
    wrong = [f"{k} = {config[k]!r} (Tora/CogVideoX-1.0 needs {v!r})"
             for k, v in FIXED_CONFIG.items() if k in config and config[k] != v]
    if wrong:
        raise DiffusersFormatError(f"{source} describes another architecture than Tora's CogVideoX-1.0 "
                                   f"transformer: " + "; ".join(wrong)
                                   + (" (patch_size_t / ofs_embed_dim: a CogVideoX-1.5 model)"
                                      if config.get("patch_size_t") or config.get("ofs_embed_dim") else ""))


# ----------------------------------------------------------------------------------------------
# Expected key sets (meta tensors, nothing allocated)
# ----------------------------------------------------------------------------------------------

def meta_sat_state(params: DictConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """SAT state dict (no prefix) of the DiT for ``params``, as meta tensors."""
    from .dit import DiffusionTransformer

    with init_on_device("meta"):
        model = DiffusionTransformer(params, dtype=dtype)
    return dict(model.state_dict())


def expected_diffusers_state(params: DictConfig, with_motion: bool = True, learned_pos_embedding: bool = False,
                             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The diffusers key -> meta tensor set a folder for ``params`` holds."""
    out = {}
    for key, tensor in meta_sat_state(params, dtype).items():
        found = find_sat_rule(key)
        names = diffusers_names(key, learned_pos_embedding)
        for name, part in zip(names, split(found[0], tensor) if names else []):
            if with_motion or not name.startswith(MOTION_PREFIXES_DIFFUSERS):
                out[name] = part
    return out


def _num_patches(params: DictConfig) -> int:
    frames = (params.num_frames - 1) // params.time_compressed_rate + 1
    return frames * (params.latent_height // params.patch_size) * (params.latent_width // params.patch_size)


# ----------------------------------------------------------------------------------------------
# Reading a diffusers folder
# ----------------------------------------------------------------------------------------------

def find_transformer_dir(path: str | os.PathLike) -> Optional[Path]:
    """The transformer folder of ``path`` if it is a diffusers folder (the model root with
    ``transformer/``, or the transformer folder itself), else None.  Decided by the contents:
    a ``config.json`` there (its class and the weights next to it are checked by :class:`DiffusersFolder`)."""
    path = Path(path)
    for candidate in (path, path / TRANSFORMER_DIR):
        if (candidate / CONFIG_FILE).is_file():
            return candidate  # weights missing or config of another model: DiffusersFolder says so
    return None


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFolder:
    """A diffusers model folder (``config.json`` + ``diffusion_pytorch_model*.safetensors``), read lazily:
    names, shapes and dtypes from the safetensors headers; a tensor is memory-mapped only when asked for."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.config = self._read_config()
        self.class_name = self.config.get("_class_name")
        self._check_config()  # before the weights: the clearer error for a folder of another model
        self.files = self._weight_files()
        self.entries = self._read_headers()  # key -> (file, dtype, shape, byte offset, byte length)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dir})"

    def _check_config(self) -> None:
        """Subclasses refuse a config.json of another model here."""

    def _read_config(self) -> dict:
        file = self.dir / CONFIG_FILE
        try:
            config = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DiffusersFormatError(f"cannot read {file}: {err}") from None
        if not isinstance(config, dict):
            raise DiffusersFormatError(f"{file} does not hold a JSON object")
        return config

    def _weight_files(self) -> dict[str, Path]:
        """key -> shard file from the index (sharded), or {} for the single weights file."""
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DiffusersFormatError(f"cannot read the shard index {index}: {err!r}") from None
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise DiffusersFormatError(f"{index} lists shard(s) that do not exist in {self.dir}: {missing}")
            return {k: self.dir / f for k, f in weight_map.items()}
        if not (self.dir / WEIGHTS_NAME).is_file():
            present = sorted(p.name for p in self.dir.glob("*.safetensors"))
            raise DiffusersFormatError(f"no weights in {self.dir}: expected {WEIGHTS_NAME} or {INDEX_NAME}"
                                       + (f" (found only {present})" if present else ""))
        return {}

    def _read_headers(self) -> dict[str, tuple]:
        files = sorted(set(self.files.values())) if self.files else [self.dir / WEIGHTS_NAME]
        entries = {}
        for file in files:
            try:
                header, data_start = _safetensors_header(file)
                with safe_open(file, framework="pt") as handle:  # validates the file; reads no tensor
                    keys = list(handle.keys())
            except Exception as err:
                raise DiffusersFormatError(f"cannot read {file}: {err}") from None
            for key in keys:
                info = header[key]
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise DiffusersFormatError(f"{file}: tensor {key} has dtype {info['dtype']}, which this "
                                               f"loader does not read ({sorted(_SAFETENSORS_DTYPES)})")
                begin, end = info["data_offsets"]
                entries[key] = (file, _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]),
                                data_start + begin, end - begin)
        if self.files:
            not_found = [k for k in self.files if k not in entries]
            elsewhere = [k for k in entries if self.files.get(k) != entries[k][0]]
            if not_found or elsewhere:
                raise DiffusersFormatError(f"{self.dir / INDEX_NAME} does not match its shards: "
                                           f"{len(not_found)} listed key(s) absent {not_found[:4]}, "
                                           f"{len(elsewhere)} not where the index says {elsewhere[:4]}")
        return entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple:
        return self.entries[key][2]

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key][1]

    def tensor(self, key: str) -> torch.Tensor:
        """The stored tensor, memory-mapped (copy-on-write: nothing is read before use)."""
        file, dtype, shape, offset, length = self.entries[key]
        if length == 0:
            return torch.empty(shape, dtype=dtype)
        raw = np.memmap(file, dtype=np.uint8, mode="c", offset=offset, shape=(length,))
        return torch.from_numpy(raw).view(dtype).reshape(shape)

    def meta_state(self) -> dict[str, torch.Tensor]:
        return {k: torch.empty(self.shape(k), dtype=self.dtype(k), device="meta") for k in self.entries}

    def load_into(self, module: torch.nn.Module, what: str) -> None:
        """Strict copy into a module whose state dict uses this folder's names (one tensor at a time)."""
        expected = module.state_dict()
        check_keys(expected, self.meta_state(), f"{self.dir} ({what})", optional=())
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(self.tensor(key))


class DiffusersFolder(SafetensorsFolder):
    """The transformer folder of a diffusers-format Tora (or CogVideoX base) model."""

    def __init__(self, path: str | os.PathLike):
        root = Path(path)
        directory = find_transformer_dir(root)
        if directory is None:
            raise DiffusersFormatError(f"{root} is not a diffusers model folder (expected {CONFIG_FILE} and "
                                       f"{WEIGHTS_NAME} there or in {root / TRANSFORMER_DIR})")
        self._params: Optional[DictConfig] = None
        self._validated = False
        super().__init__(directory)

    def _check_config(self) -> None:
        check_config(self.config, str(self.dir / CONFIG_FILE))

    # -- model -----------------------------------------------------------------------------------
    @property
    def has_motion(self) -> bool:
        return self.class_name == CLASS_TORA

    @property
    def learned_pos_embedding(self) -> bool:
        return bool(self.config.get("use_learned_positional_embeddings"))

    def params(self) -> DictConfig:
        """SAT ``network_config.params`` this folder's config.json describes (computed once; a shared
        object: copy it before changing it)."""
        if self._params is None:
            self._params = params_from_config(self.config, str(self.dir / CONFIG_FILE))
        return self._params

    def validate(self) -> None:
        """Strict check of the tensors against config.json: missing, unexpected and mis-shaped keys by group,
        in the diffusers names (checked once per folder object)."""
        if self._validated:
            return
        expected = expected_diffusers_state(self.params(), self.has_motion, self.learned_pos_embedding)
        source = f"{self.dir} ({self.class_name}; tensors against its {CONFIG_FILE})"
        check_keys(expected, self.meta_state(), source, optional=())
        self._validated = True

    def sat_state(self) -> "SATView":
        self.validate()
        return SATView(self)


def _safetensors_header(file: Path) -> tuple[dict, int]:
    """(header JSON, byte offset of the data section) - the documented layout: 8-byte little-endian header
    length, the JSON header, then the tensor data."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


class SATView(Mapping):
    """A diffusers folder seen under SAT keys (no prefix), for :func:`tora.checkpoint.load_into`:
    each SAT tensor is assembled (qkv/adaLN merged) only when read, so loading copies one tensor at a time.
    Derived SAT entries (rotary tables, unused position tables) are absent; the loader treats them as
    optional.  ``shape_of`` and ``source_name`` let the strict key check report in the diffusers names."""

    def __init__(self, folder: DiffusersFolder):
        self.folder = folder
        self.parts: dict[str, tuple[Rule, list[str]]] = OrderedDict()
        for key in folder.keys():
            rule, _, fields = find_diffusers_rule(key)  # validate() guarantees a rule
            sat_key = rule.sat_key(fields)
            self.parts.setdefault(sat_key, (rule, rule.diffusers_keys(fields)))

    def __getitem__(self, key: str) -> torch.Tensor:
        rule, names = self.parts[key]
        return merge(rule, [self.folder.tensor(n) for n in names])

    def __iter__(self):
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    def shape_of(self, key: str) -> tuple:
        rule, names = self.parts[key]
        return torch.Size(merged_shape(rule, [self.folder.shape(n) for n in names]))

    def source_name(self, sat_key: str) -> str:
        names = diffusers_names(sat_key, learned_pos_embedding=True)
        return " + ".join(names) if names else sat_key

    def __str__(self) -> str:
        return str(self.folder.dir)


def read_sat_state(path: str | os.PathLike) -> tuple[SATView, Path]:
    """(lazy SAT-keyed state, transformer folder) of a diffusers folder, validated against its config.json."""
    folder = DiffusersFolder(path)
    state = folder.sat_state()
    if folder.learned_pos_embedding:
        logger.warning("%s has use_learned_positional_embeddings: true (diffusers' CogVideoX-I2V convention): "
                       "its table is loaded as mixins.pos_embed.pos_embedding, and added only if "
                       "model.network_config.params.modules.pos_embed_config.params.add_learnable_pos_embed "
                       "is true (Tora never adds it)", folder.dir)
    return state, folder.dir


# ----------------------------------------------------------------------------------------------
# Conversion plans (names and shapes only; used by the dry run and both writers)
# ----------------------------------------------------------------------------------------------

@dataclass
class Step:
    sat: str
    diffusers: list[str]
    rule: Rule


def plan(sat_keys: Iterable[str], learned_pos_embedding: bool = False) -> list[Step]:
    """One step per SAT key; unknown keys (another model's checkpoint) raise, grouped."""
    steps, unknown = [], []
    for key in sat_keys:
        found = find_sat_rule(key)
        if found is None:
            unknown.append(key)
            continue
        steps.append(Step(key, diffusers_names(key, learned_pos_embedding), found[0]))
    if unknown:
        raise DiffusersFormatError(f"{len(unknown)} SAT key(s) have no diffusers name (a checkpoint of another "
                                   f"model?):\n{_group(unknown)}")
    return steps


def describe_plan(steps: list[Step], shapes: Mapping[str, tuple], direction: str = "to-diffusers") -> str:
    """The dry run: one line per rule (SAT template, op, tensors, parameter elements, diffusers template),
    then the totals.  SAT-only entries read "dropped" (to-diffusers) or "filled" (to-sat: recomputed
    rotary tables, zero tables)."""
    absent = "(dropped)" if direction == "to-diffusers" else "(filled: rotary recomputed, tables zeros)"
    rows: dict[tuple, list[int]] = OrderedDict()
    for step in steps:
        rule = step.rule
        target = ", ".join(rule.diffusers) if step.diffusers else absent
        key = (rule.group, rule.sat, rule.op if step.diffusers else "-", target)
        row = rows.setdefault(key, [0, 0])
        row[0] += 1
        row[1] += int(np.prod(shapes[step.sat]))
    lines = [f"{direction}: {'group':28s} {'SAT key':54s} {'op':6s} {'tensors':>7s} {'elements':>15s}  "
             f"diffusers key(s)"]
    for (group, sat, op, target), (count, elements) in rows.items():
        lines.append(f"{direction}: {group:28s} {sat:54s} {op:6s} {count:7d} {elements:15,d}  {target}")
    kept = [s for s in steps if s.diffusers]
    elements = lambda chosen: sum(int(np.prod(shapes[s.sat])) for s in chosen)  # noqa: E731
    lines.append(f"{direction}: SAT {len(steps)} tensors, {elements(steps):,} elements; diffusers "
                 f"{sum(len(s.diffusers) for s in kept)} tensors, {elements(kept):,} elements")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def refuse_existing(path: Path, what: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{what} {path} already exists; remove it or choose another output "
                              f"(nothing is overwritten)")


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_NAME]
    stem = WEIGHTS_NAME[: -len(".safetensors")]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def check_sat_state(state: Mapping[str, torch.Tensor], params: DictConfig, source: str) -> bool:
    """Strict key/shape check of a SAT state against ``params`` (unknown keys first, as another model's);
    a state without any motion module is the CogVideoX base.  Returns whether it has motion modules."""
    plan(state)
    expected = meta_sat_state(params)
    with_motion = any(k.startswith(MOTION_PREFIXES_SAT) for k in state)
    if not with_motion:
        expected = {k: v for k, v in expected.items() if not k.startswith(MOTION_PREFIXES_SAT)}
    check_keys(expected, state, f"{source} (against the network config)")
    return with_motion


def write_diffusers_folder(state: Mapping[str, torch.Tensor], params: DictConfig, out_dir: str | os.PathLike,
                           learned_pos_embedding: bool = False, source: str = "the SAT checkpoint",
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """SAT ``state`` (no prefix; e.g. memory-mapped from the .pt) -> ``out_dir`` = config.json + shards.

    Checked against ``params`` first (strict, SAT names).  A state without motion modules (the CogVideoX
    base) becomes a ``CogVideoXTransformer3DModel`` folder, a Tora state a ``ToraTransformer3DModel`` one.
    Tensors are converted one shard at a time; the folder is assembled under a temporary name and renamed
    into place, so a failure leaves nothing behind.
    """
    out_dir = Path(out_dir)
    refuse_existing(out_dir, "output folder")
    with_motion = check_sat_state(state, params, source)
    steps = [s for s in plan(state, learned_pos_embedding) if s.diffusers]
    class_name = CLASS_TORA if with_motion else CLASS_COGVIDEOX
    shards = _pack(steps, {s.sat: state[s.sat].nbytes for s in steps}, max_shard_bytes)
    names = _shard_names(len(shards))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        weight_map, total = {}, 0
        for name, shard in zip(names, shards):
            tensors = {}
            for step in shard:
                for key, part in zip(step.diffusers, split(step.rule, state[step.sat])):
                    tensors[key] = part.contiguous()
                    weight_map[key] = name
                    total += part.nbytes
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            del tensors
        if len(names) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config = config_from_params(params, class_name, learned_pos_embedding)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty (refuse_existing)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _pack(steps: list[Step], nbytes: Mapping[str, int], limit: int) -> list[list[Step]]:
    shards, size = [[]], 0
    for step in steps:
        if shards[-1] and size + nbytes[step.sat] > limit:
            shards.append([])
            size = 0
        shards[-1].append(step)
        size += nbytes[step.sat]
    return shards


def sat_state_from_folder(folder: DiffusersFolder, scratch: Optional[Path] = None,
                          params: Optional[DictConfig] = None) -> dict[str, torch.Tensor]:
    """The complete SAT state (no prefix, the official key set) of a validated folder.

    Copied tensors stay memory-mapped; merged ones (qkv, adaLN) go to memory-mapped files in ``scratch``
    when given (else RAM); the non-representable entries are filled: rotary tables recomputed from the
    config, SAT's unused absolute table zeros, the I2V table from the folder or zeros.
    """
    params = params if params is not None else folder.params()
    view = folder.sat_state()
    float_dtype = folder.dtype("patch_embed.proj.weight")
    derived = _derived_sat_tensors(params, float_dtype)
    state = {}
    for key, meta in meta_sat_state(params, float_dtype).items():
        if key in view:
            rule, names = view.parts[key]
            out = None
            if scratch is not None and rule.op in ("qkv", "adaln"):
                out = _scratch_tensor(scratch, key, view.shape_of(key), folder.dtype(names[0]))
            state[key] = merge(rule, [folder.tensor(n) for n in names], out)
        elif key in derived:
            state[key] = derived[key]
        elif key.startswith(MOTION_PREFIXES_SAT) and not folder.has_motion:
            continue  # a CogVideoX base folder: no motion modules
        else:
            raise DiffusersFormatError(f"{folder.dir}: no tensor for SAT key {key}")
    return state


def _derived_sat_tensors(params: DictConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from .dit import Rotary3DPositionEmbeddingMixin

    pe = params.modules.pos_embed_config.params
    frames = (params.num_frames - 1) // params.time_compressed_rate + 1
    p = params.patch_size
    rope = Rotary3DPositionEmbeddingMixin(frames, params.latent_height // p, params.latent_width // p,
                                          params.hidden_size, pe.hidden_size_head, pe.text_length, pe.theta)
    cos, sin = rope.rope_tables()
    derived = {"mixins.pos_embed.freqs_cos": cos.to(dtype), "mixins.pos_embed.freqs_sin": sin.to(dtype),
               "transformer.position_embeddings.weight":
                   torch.zeros(params.transformer_args.max_sequence_length, params.hidden_size, dtype=dtype)}
    if pe.learnable_pos_embed:
        derived["mixins.pos_embed.pos_embedding"] = torch.zeros(
            1, pe.text_length + _num_patches(params), params.hidden_size, dtype=dtype)
    return derived


def _scratch_tensor(scratch: Path, key: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    numel = int(np.prod(shape))
    file = scratch / f"{key}.bin"
    raw = np.memmap(file, dtype=np.uint8, mode="w+", shape=(max(numel * dtype.itemsize, 1),))
    return torch.from_numpy(raw).view(dtype)[:numel].reshape(shape)


def write_sat_checkpoint(folder: DiffusersFolder, out_dir: str | os.PathLike, iteration: int = 1) -> Path:
    """``out_dir/latest`` + ``out_dir/<iteration>/mp_rank_00_model_states.pt`` (``{"module": ...}`` with the
    ``model.diffusion_model.`` prefix: the container SAT's ``load_checkpoint`` reads)."""
    out_dir = Path(out_dir)
    refuse_existing(out_dir, "output folder")
    if iteration < 1:
        raise ValueError(f"iteration must be >= 1 (SAT's loader refuses 0), got {iteration}")
    target = out_dir / str(iteration)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".scratch.") as scratch:
        state = sat_state_from_folder(folder, Path(scratch))
        atomic_torch_save({"module": {DIT_PREFIX + k: v for k, v in state.items()}}, target / MODEL_FILE)
        del state
    atomic_write_text(out_dir / "latest", str(iteration))
    return target / MODEL_FILE


def sha256_of(tensor: torch.Tensor) -> str:
    """sha256 of dtype, shape and raw bytes (the golden manifests' per-tensor hash)."""
    import hashlib

    digest = hashlib.sha256()
    digest.update(str(tensor.dtype).encode())
    digest.update(str(tuple(tensor.shape)).encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
