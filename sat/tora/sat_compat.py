"""Shims between this project, SwissArmyTransformer 0.4.12 (SAT) and DeepSpeed - all in one place.

Training runs through SAT's ``training_main`` and DeepSpeed, as the official code does.  A few things
need help; each shim below says what breaks without it (measured, see ``shared/spec/cpu_notes.md`` 2):

CPU (CI, laptops; the same ``training_main`` with gloo and fp32):

* DeepSpeed needs ``RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT`` even for one process
  (otherwise ``mpi_discovery`` -> "No module named 'mpi4py'"); :func:`single_process_env`.
* DeepSpeed JIT-compiles a shared-memory op with g++ in every ``init_distributed`` on CPU (~70 s);
  it is not needed with gloo: :func:`prepare_process` turns it off.
* ``sat.get_args`` rejects ``args.device='cpu'`` for training ("LOCAL_RANK ... and args.device
  inconsistent") and calls ``torch.cuda.set_device``; :func:`sat_get_args` passes the local rank
  as the device, skips ``set_device`` and sets ``device='cpu'`` afterwards.
* SAT's ``Timers`` call ``torch.cuda.synchronize()`` ("Found no NVIDIA driver"): a no-op on a
  machine without CUDA (:func:`prepare_process`).
* CUDA RNG state is only saved/restored when CUDA exists (``tora.training`` checkpoints).
* fp16 does not exist on CPU and ZeRO without a config turns it on: the DeepSpeed config is always
  written explicitly (``tora.training.deepspeed_config``), bf16 only on GPU.

SAT's training loop: :func:`patch_module_attributes` swaps functions of
``sat.training.deepspeed_training`` for the duration of one ``training_main`` call (the loader, the
learning-rate scheduler factory, the checkpoint writer, the step, the TensorBoard writer); the
replacements and the reasons live in ``tora.training`` (``Trainer.sat_replacements``).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import socket
from typing import Iterator

import torch


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
    """Process-wide settings before SAT/DeepSpeed start (idempotent)."""
    single_process_env()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.cuda.synchronize = lambda *args, **kwargs: None  # SAT Timers; nothing to wait for
    # deepspeed.comm builds this op in every init_distributed; gloo does not use it.  The module
    # must be fetched with importlib: `import deepspeed.comm.torch as m` binds the torch package.
    if not torch.cuda.is_available():
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def sat_get_args(argv: list[str]):
    """``sat.get_args`` (parses SAT's flags, reads the DeepSpeed JSON, initialises torch.distributed,
    SAT's model-parallel state and DeepSpeed's communication) on GPU or CPU."""
    prepare_process()
    from sat import get_args
    cuda = torch.cuda.is_available()
    argv = list(argv) + ["--distributed-backend", "nccl" if cuda else "gloo"]
    if cuda:
        return get_args(argv)
    argv += ["--device", os.environ.get("LOCAL_RANK", "0")]  # SAT insists device == local rank
    real_set_device = torch.cuda.set_device
    torch.cuda.set_device = lambda *args, **kwargs: None
    try:
        args = get_args(argv)
    finally:
        torch.cuda.set_device = real_set_device
    args.device = "cpu"
    return args


@contextlib.contextmanager
def patch_module_attributes(module, replacements: dict) -> Iterator[None]:
    """Replace ``module.<name>`` by the given objects inside the block, restore them afterwards.

    Unknown names are an error: a SAT upgrade that renames a hooked function must fail loudly.
    """
    missing = [name for name in replacements if not hasattr(module, name)]
    if missing:
        raise AttributeError(f"{module.__name__} has no {missing}: SAT version mismatch (tested with 0.4.12)")
    saved = {name: getattr(module, name) for name in replacements}
    try:
        for name, value in replacements.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def cuda_rng_state():
    """The CUDA RNG state of this process's device, or None without CUDA."""
    return torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def set_cuda_rng_state(state) -> None:
    if state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state)
