"""Building the DiT and loading its starting weights: the one place sampling and training share.

* :func:`build_dit` - the DiT of a config, built on the meta device, then given the weights of a
  Tora checkpoint (``--load``) or random ones.
* :func:`load_base_weights` - training's ``args.load``: a Tora checkpoint (every key), or the
  CogVideoX-5B SAT transformer, which lacks the motion modules (they start from
  :func:`init_motion_modules_`: fusers = identity).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig
from torch import nn

from .checkpoint import (CheckpointError, init_on_device, load_dit_checkpoint, load_into, materialize,
                         read_dit_state, resolve_checkpoint)
from .dit import DiffusionTransformer

logger = logging.getLogger(__name__)

UNTRAINED_MARKER = "UNTRAINED"  # file in a checkpoint folder whose weights are random (tiny demo/CI)
ABOUT_FILE = "ABOUT"  # file in a checkpoint folder saying what a small trained model is (printed on load)
# Parameters that the official base checkpoint (CogVideoX-5B) lacks: Tora's motion modules.
MOTION_MODULE_KEYS = ("traj_extractor.", "mixins.adaln_layer.fuser_list.")


def build_dit(cfg: DictConfig, load: Optional[str], device: torch.device, dtype: torch.dtype,
              seed: int = 0) -> DiffusionTransformer:
    """The DiT with weights from ``load`` (a SAT checkpoint), or random weights when ``load`` is None.

    Built on the meta device first, so the full model is never initialised twice in host memory.
    """
    with init_on_device("meta"):
        dit = DiffusionTransformer(cfg.model.network_config.params)
    dit = materialize(dit, device, dtype)
    if load is None:
        randomize_(dit, seed)
    else:
        load_dit_checkpoint(dit, load)
        if (Path(load) / UNTRAINED_MARKER).exists():
            logger.warning("the DiT checkpoint %s holds RANDOM, UNTRAINED weights (tiny demo model): "
                           "the video will not show real content", load)
        elif (Path(load) / ABOUT_FILE).is_file():  # what a small project-trained model is
            logger.warning("%s: %s", load, (Path(load) / ABOUT_FILE).read_text().strip())
    return dit.eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights (benchmarks, tiny checkpoints): N(0, std) matrices, unit norms, zero biases."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if "freqs_" in name:  # rotary tables: derived from the config, not weights
            continue
        if not tensor.is_floating_point():
            tensor.zero_()  # BatchNorm's num_batches_tracked (uninitialised after a meta build)
        elif name.endswith("running_var") or (tensor.dim() == 1 and name.endswith("weight")):
            tensor.fill_(1.0)
        elif name.endswith("running_mean") or tensor.dim() == 1:
            tensor.zero_()
        else:
            tensor.normal_(0.0, std, generator=generator)


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
