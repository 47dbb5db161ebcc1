"""Process-level setup: devices, dtypes, torch.distributed, seeds.

Everything that depends on *where* the code runs (CPU or GPU, one process or ``torchrun``) lives
here, so the model and engine code stays free of it.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from .config import ConfigError


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` ("cpu", "cuda", "cuda:1") or the local GPU when there is one, else the CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"args.device = '{requested}', but no CUDA GPU is available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (the released weights' precision), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def init_distributed() -> None:
    """Create the process group (NCCL on GPU, gloo on CPU) and SAT's model-parallel state (size 1).

    Safe to call repeatedly.  Unlike SAT's model-only init it neither reseeds the global RNGs nor
    touches cuDNN flags.  A single process without ``torchrun`` gets a private gloo group.
    """
    from sat import mpu
    if not torch.distributed.is_initialized():
        world = world_size()
        use_nccl = torch.cuda.is_available() and world > 1
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        if world > 1:
            address, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
        else:
            from sat.helpers import get_free_port
            address, port = "127.0.0.1", str(get_free_port())
        torch.distributed.init_process_group(
            backend="nccl" if use_nccl else "gloo", init_method=f"tcp://{address}:{port}",
            world_size=world, rank=rank())
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_pairs():
    """Process groups of two consecutive ranks (CFG parallel): (my group, my rank in it, pair index,
    number of pairs).  Every rank creates every group, as torch.distributed requires."""
    init_distributed()
    world = world_size()
    if world % 2:
        raise ConfigError(f"acceleration.cfg_parallel needs an even number of processes, got {world}")
    groups = [torch.distributed.new_group([2 * p, 2 * p + 1]) for p in range(world // 2)]
    return groups[rank() // 2], rank() % 2, rank() // 2, world // 2
