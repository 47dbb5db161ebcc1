"""What SwissArmyTransformer 0.4.12 (SAT) and DeepSpeed need around a training process - in one place.

The DiT is a SAT ``BaseModel`` with mixins (the published checkpoints' layout).  Its SAT layers
read SAT's model-parallel state (``runtime.init_distributed`` creates it, size 1), and on a GPU
SAT's activation checkpointing is DeepSpeed's, which must be configured and seeded
(:func:`configure_activation_checkpointing`).  On the CPU (CI, laptops; gloo and fp32):

* DeepSpeed needs ``RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT`` even for one process
  (otherwise ``mpi_discovery`` -> "No module named 'mpi4py'"): :func:`single_process_env`.
* DeepSpeed picks its accelerator at import and warns "Setting accelerator to CPU"; naming it
  (``DS_ACCELERATOR=cpu``) before the first import keeps the log quiet (``tora.logs``).
* DeepSpeed JIT-compiles a shared-memory op with g++ in every ``init_distributed`` on CPU (~70 s);
  gloo does not use it: :func:`prepare_process` turns it off.

:func:`quiet_logs` puts SAT's and DeepSpeed's INFO chatter below the default level.
"""
from __future__ import annotations

import importlib
import logging
import os
import socket

import torch

from .logs import quiet_libraries

THIRD_PARTY_LOGGERS = ("sat", "DeepSpeed")  # their INFO lines go below the default level


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_env() -> None:
    """Fill in the torch.distributed environment of a 1-process run (torchrun sets it itself)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def prepare_process() -> None:
    """Process-wide settings before DeepSpeed starts (idempotent)."""
    single_process_env()
    quiet_libraries()  # DeepSpeed's accelerator and SAT's log level, in case they are not imported yet
    if torch.cuda.is_available():
        return
    # deepspeed.comm builds this op in every init_distributed; gloo does not use it.  The module
    # must be fetched with importlib: `import deepspeed.comm.torch as m` binds the torch package.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def configure_activation_checkpointing(ds_config: dict, num_layers: int, seed: int) -> None:
    """SAT's ``checkpoint`` is DeepSpeed's on a GPU (``torch.utils.checkpoint`` without CUDA): give
    it the config's ``activation_checkpointing`` section and the model-parallel RNG seed, as SAT's
    own start-up does."""
    import deepspeed
    from sat import mpu
    deepspeed.checkpointing.configure(mpu, deepspeed_config=ds_config, num_checkpoints=num_layers)
    mpu.model_parallel_cuda_manual_seed(seed)  # a no-op without CUDA


def cuda_flags_as_sat() -> None:
    """The cuDNN/TF32 flags SAT's start-up (``set_random_seed``) set for training on a GPU: the
    measured training step times (docs/PERFORMANCE.md) were taken with them."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.enabled = True
    torch.backends.cuda.matmul.allow_tf32 = False


def quiet_logs(level: int = logging.WARNING) -> None:
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
