"""Fine-tuning Tora: the loop (:func:`train`, top to bottom) and what it keeps across steps.

    run = start_run(cfg)                  checked config, processes (NCCL / gloo), a new run folder
    state = build_state(run, ...)         DiT + loss in a DeepSpeed engine (ZeRO-2, bf16 on GPU, fp32 on
                                          CPU; torch AdamW on the official decay groups), resumed state
    while state.iteration < train_iters:
        lr = learning_rate(step)          the official AnnealingLR schedule, written out
        train_step(...)                   accumulation x (inputs -> loss -> backward), DeepSpeed's step
                                          (average over ranks, clip, AdamW), EMA
        log.step(record)                  metrics.jsonl, TensorBoard, progress bar, a log line
        save_checkpoint(state, ...)       every save_interval steps and at the end (run_folder)

:class:`TrainState` is what a checkpoint holds and resume restores; the data position and every
random draw are functions of the iteration (``tora.train_inputs``), so a resumed run replays the same
steps: its loss curve equals an uninterrupted one (bit for bit on the CPU).  The step's inputs
(motion video, latents, text) come from ``train_inputs.BatchPreparer``; only the DiT's
``trainable_modules`` get gradients::

    loss = VideoDiffusionLoss(DiT, x0, context, concat, video_flow=motion latents)   (v-MSE)
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader

from . import run_folder, sat_compat
from .checkpoint import CheckpointError, load_dit_checkpoint, load_state_dict
from .config import ConfigError
from .diffusion import DiscreteDenoiser, VideoDiffusionLoss, conditioned_network
from .dit import DiffusionTransformer
# Model factory and base loading (shared with sampling); these names stay importable from here.
from .model_factory import (MOTION_MODULE_KEYS, UNTRAINED_MARKER, base_checkpoint,  # noqa: F401
                            expand_patch_embedding_, init_motion_modules_, load_base_weights)
from .run_folder import CONFIG_FILE, DEEPSPEED_TAG, METRICS_FILE, TRAINING_STATE_FILE
from .runtime import DTYPES, default_dtype, pick_device, seed_everything
# The step's inputs; these names stay importable from here.
from .train_inputs import (RAFT_MIN_SIZE, BatchPreparer, Components, EpochKeyed,  # noqa: F401
                           StepBatchSampler, StepRandom, build_components, clip_flows,
                           motion_video_from_clip, step_seed, worker_flows, write_random_raft)

logger = logging.getLogger(__name__)

LR_DECAY_STYLES = ("linear", "cosine", "exponential", "constant", "None")  # SAT AnnealingLR's names


# ----------------------------------------------------------------------------------------------
# The module DeepSpeed trains
# ----------------------------------------------------------------------------------------------

def trainable_names(module: nn.Module, patterns) -> list[str]:
    """Names of the parameters whose name matches one of the regexes (official ``trainable_modules``)."""
    import re
    compiled = [re.compile(p) for p in patterns]
    return [name for name, _ in module.named_parameters() if any(c.search(name) for c in compiled)]


class ToraTrainingModule(nn.Module):
    """The DiT (as ``model.diffusion_model``, the official engine's key layout) and its loss.

    ``forward(inputs)`` (from :class:`BatchPreparer`) returns the mean v-prediction loss of the
    micro-batch.  :meth:`disable_untrainable_params` runs before the optimizer is built.
    """

    def __init__(self, dit: DiffusionTransformer, loss_fn: VideoDiffusionLoss, trainable_modules):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = dit
        self.loss_fn = loss_fn
        self.trainable_modules = list(trainable_modules)

    @property
    def dit(self) -> DiffusionTransformer:
        return self.model.diffusion_model

    def disable_untrainable_params(self) -> int:
        """Freeze every parameter outside ``trainable_modules``; returns (and logs) the trainable count."""
        names = set(trainable_names(self.dit, self.trainable_modules))
        if not names:
            raise ConfigError(f"model.trainable_modules {self.trainable_modules} match no DiT parameter")
        for name, param in self.dit.named_parameters():
            param.requires_grad_(name in names)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        logger.info("trainable parameters: %s of %s (%.2f %%) in modules matching %s",
                    f"{trainable:,}", f"{total:,}", 100 * trainable / total, self.trainable_modules)
        return trainable

    def forward(self, inputs: dict) -> Tensor:
        cond = {"crossattn": inputs["context"]}
        if inputs.get("concat") is not None:
            cond["concat"] = inputs["concat"]
        loss = self.loss_fn(conditioned_network(self.dit), inputs["x0"], cond, generator=inputs["generator"],
                            video_flow=inputs["video_flow"])
        return loss.mean()


class EMA:
    """Exponential moving average (fp32) of the trainable weights: e <- d e + (1 - d) w after every
    optimizer step (the official FusedEmaAdam's EMA, decay 0.9999).  Kept by global rank 0 only."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for name, param in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def state_dict(self, module: nn.Module) -> dict:
        """The module's state dict with the EMA weights in place of the trainable ones."""
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        state.update({k: v.cpu() for k, v in self.shadow.items()})
        return state



# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------

def training_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype:
    """``args.dtype`` (auto: bf16 on GPU, fp32 on CPU; official ``args.bf16: true`` means bf16)."""
    if cfg.args.dtype != "auto":
        return DTYPES[cfg.args.dtype]
    if cfg.args.bf16:
        return torch.bfloat16
    return default_dtype(device)


def deepspeed_config(cfg: DictConfig, dtype: torch.dtype) -> dict:
    """The ``deepspeed:`` section made runnable: precision from the training dtype (bf16 or fp32;
    fp16 is not supported), torch's AdamW (``torch_adam``: no JIT-compiled op; the official
    ``sat.ops.FusedEmaAdam`` is a CUDA op - its EMA is ``args.ema_decay`` here)."""
    ds = copy.deepcopy(OmegaConf.to_container(cfg.deepspeed, resolve=True)) if cfg.deepspeed else {}
    if not isinstance(ds, dict):
        raise ConfigError("'deepspeed' must be a mapping (the DeepSpeed config)")
    if (ds.get("fp16") or {}).get("enabled"):
        raise ConfigError("deepspeed.fp16.enabled = true is not supported: Tora trains in bf16 (GPU) or fp32")
    ds["fp16"] = {"enabled": False}
    ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": dtype == torch.bfloat16}
    ds.setdefault("train_micro_batch_size_per_gpu", 1)
    ds.setdefault("gradient_accumulation_steps", 1)
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    zero = ds.setdefault("zero_optimization", {"stage": 2})
    if zero.get("stage", 0) not in (0, 1, 2):
        raise ConfigError(f"deepspeed.zero_optimization.stage = {zero.get('stage')} is not supported "
                          "(ZeRO-3 partitions the SAT model's construction; use 2, the official value)")
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    if str(optimizer.get("type", "")).endswith("FusedEmaAdam"):
        logger.info("deepspeed.optimizer %s (a CUDA op) -> torch AdamW; its EMA is args.ema_decay",
                    optimizer["type"])
        optimizer["type"] = "AdamW"
        for key in ("ema_decay", "adam_w_mode"):
            params.pop(key, None)
    if optimizer.get("type") not in ("Adam", "AdamW"):
        raise ConfigError(f"deepspeed.optimizer.type {optimizer.get('type')!r}: only Adam/AdamW are supported")
    params["torch_adam"] = True
    params.setdefault("lr", 1e-4)
    ds["zero_allow_untested_optimizer"] = True
    return ds


def check_training_config(cfg: DictConfig) -> None:
    a = cfg.args

    def fail(key: str, why: str):
        raise ConfigError(f"args.{key} = {a[key]!r}: {why}")

    if a.mode != "finetune":
        fail("mode", "train_video.py needs mode finetune (set by configs/tora/train_*.yaml)")
    if a.train_iters < 1:
        fail("train_iters", "must be >= 1")
    if a.seed < 1:
        fail("seed", "must be >= 1 (the official SAT code asserts a positive seed)")
    if not a.train_data:
        fail("train_data", "name at least one data folder")
    if a.save_interval < 1 or a.log_interval < 1:
        fail("save_interval" if a.save_interval < 1 else "log_interval", "must be >= 1")
    if a.keep_last_checkpoints < 0:
        fail("keep_last_checkpoints", "must be >= 0 (0 keeps all)")
    if not 0.0 <= a.ema_decay < 1.0:
        fail("ema_decay", "must be in [0, 1) (0 = no EMA)")
    if a.auto_warmup_steps > 0 and a.warmup <= 0:
        fail("warmup", "must be > 0 while args.auto_warmup_steps > 0 (the schedule divides by it)")
    if a.lr_decay_style not in LR_DECAY_STYLES:
        fail("lr_decay_style", f"choose one of {list(LR_DECAY_STYLES)}")
    if not 0.0 <= a.warmup <= 1.0:
        fail("warmup", "must be in [0, 1] (a fraction of the decay length)")
    if a.model_parallel_size != 1:
        fail("model_parallel_size", "only 1 is supported")
    if not a.resume and bool(a.load) == a.from_scratch:
        if a.from_scratch:
            fail("from_scratch", f"contradicts args.load = {a.load!r}: train from scratch or from weights, not both")
        fail("load", "name the starting weights with --load (stage 1: the CogVideoX-5B SAT transformer, stage 2: "
                     "the stage-1 run folder), or set args.from_scratch=true to start from the initialisation")
    if a.expand_input_channels and not (a.load and cfg.model.noised_image_input):
        fail("expand_input_channels", "needs args.load (a T2V checkpoint) and an I2V model (model.noised_image_input)")
    if a.valid_data:
        logger.warning("args.valid_data is ignored: there is no evaluation during training (official: off)")
    if cfg.model.noised_image_input != (cfg.model.network_config.params.in_channels == 32):
        raise ConfigError("model.noised_image_input must be true exactly for the I2V model "
                          "(network_config.params.in_channels 32)")


def config_changes(before: DictConfig, after: DictConfig,
                   ignore=("args.resume", "args.save", "args.experiment_name")) -> list[str]:
    """'key: old -> new' for every leaf that differs between two configs."""
    def leaves(node, prefix=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1], node
    old = dict(leaves(OmegaConf.to_container(before)))
    new = dict(leaves(OmegaConf.to_container(after)))
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and key not in ignore]




# ----------------------------------------------------------------------------------------------
# Optimizer groups and learning rate (the official SAT rules, written out)
# ----------------------------------------------------------------------------------------------

def no_decay_module_types() -> tuple[type, ...]:
    """Norm layers whose parameters get no weight decay (SAT's ``NO_WD_MODULES``)."""
    from sat.ops.layernorm import LayerNorm, RMSNorm
    return (LayerNorm, nn.LayerNorm, RMSNorm)


def decay_groups(module: nn.Module) -> list[dict]:
    """The trainable parameters in the official two AdamW groups: weights with the configured
    weight decay, then biases and the parameters of LayerNorm/RMSNorm layers with none.  Other norms
    (GroupNorm, BatchNorm) are decayed, as in SAT; a parameter flagged ``no_weight_decay`` is not."""
    norms = no_decay_module_types()
    decay, no_decay = [], []
    for layer in module.modules():
        for name, param in layer._parameters.items():
            if param is None or not param.requires_grad:
                continue
            exempt = isinstance(layer, norms) or name == "bias" or getattr(param, "no_weight_decay", False)
            (no_decay if exempt else decay).append(param)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def learning_rate(step: int, base_lr: float, args) -> float:
    """The learning rate of optimizer step ``step`` (1-based), SAT's AnnealingLR in finetune mode
    (OFFICIAL_QUIRKS.md#auto-warmup).

    With L = base_lr, T = lr_decay_iters or train_iters, W = warmup * T:
    steps 1..auto_warmup_steps use min(auto_warmup_rate L, L n / W); then L n / W up to W; then
    linear: L (T - (n - W)) / T, cosine: from L down to lr_decay_ratio L, else L.
    """
    total = max(1, args.lr_decay_iters if args.lr_decay_iters is not None else args.train_iters)
    warmup = args.warmup * total
    if step <= args.auto_warmup_steps:
        return min(float(base_lr) * args.auto_warmup_rate, float(base_lr) * step / warmup)
    if warmup > 0 and step <= warmup:
        return float(base_lr) * step / warmup
    if args.lr_decay_style == "linear":
        return base_lr * ((total - (step - warmup)) / total)
    if args.lr_decay_style == "cosine":
        ratio = 1 / args.lr_decay_ratio
        progress = min(1.0, (step - warmup) / total)
        return base_lr / ratio * ((math.cos(math.pi * progress) + 1) * (ratio - 1) / 2 + 1)
    return base_lr  # exponential (SAT: constant as well), constant, None


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------

def start_processes(device: torch.device, ds_config: dict, cfg: DictConfig) -> tuple[int, int]:
    """torch.distributed (NCCL on GPU, gloo on CPU) + DeepSpeed's communication + SAT's
    model-parallel state (size 1) and activation checkpointing; returns (rank, world size)."""
    sat_compat.prepare_process()
    sat_compat.quiet_logs()
    import deepspeed
    from .runtime import init_distributed
    if device.type == "cuda":
        torch.cuda.set_device(device)
        sat_compat.cuda_flags_as_sat()
    # Creates the process group, or adopts one that exists (a model built earlier in this process).
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)
    init_distributed()  # SAT's model-parallel state, which the DiT's SAT layers read
    sat_compat.configure_activation_checkpointing(ds_config, cfg.model.network_config.params.num_layers,
                                                  cfg.args.seed)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _broadcast(value):
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]
    return value


def _mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of a scalar over all ranks (what the log shows: the loss of the global batch)."""
    value = value.detach().clone().float()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return value


def _all_ranks_ok(ok: bool, device: torch.device) -> bool:
    """True when ``ok`` on every rank (so that no rank waits in a barrier for a failed one)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return ok
    flag = torch.tensor([1 if ok else 0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


# ----------------------------------------------------------------------------------------------
# The state a checkpoint holds
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """What a checkpoint holds and resume restores.  The data position and every random draw are
    functions of ``iteration`` (see the module docstring), so nothing else is needed to continue."""
    iteration: int  # optimizer steps done
    engine: object  # the DeepSpeed engine: trainable weights, fp32 masters, ZeRO optimizer partitions
    module: "ToraTrainingModule"
    ema: Optional["EMA"]  # rank 0 only
    # The run's shape: ZeRO partitions and the data order depend on it, so resume must match it.
    world_size: int
    micro_batch: int
    accumulation: int
    seed: int

    def shape(self) -> dict:
        return {"world_size": self.world_size, "micro_batch": self.micro_batch, "accumulation": self.accumulation}

    def record(self) -> dict:
        """``training_state.pt``."""
        return {"iteration": self.iteration, **self.shape(), "seed": self.seed,
                "consumed_micro_batches_per_rank": self.iteration * self.accumulation}


def save_checkpoint(state: TrainState, run_dir: Path, keep: int, rank: int, device: torch.device) -> None:
    """Checkpoint ``state.iteration``: stage every file, fsync, rename, then ``latest`` (run_folder).

    A failed write (a full disk) removes the staging folder and raises CheckpointError on every
    rank; the previous checkpoint and ``latest`` stay as they were.
    """
    iteration = state.iteration
    staging = run_folder.staging_dir(run_dir, iteration)
    folder = staging / str(iteration)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        folder.mkdir(parents=True)
    _barrier()
    error = None
    try:
        state.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, client_state={"iteration": iteration},
                                     save_latest=False, exclude_frozen_parameters=True)
        if rank == 0:
            _write_model_files(state, staging)
    except (OSError, RuntimeError) as err:
        error = err if isinstance(err, CheckpointError) else run_folder.write_error(err, folder)
    if not _all_ranks_ok(error is None, device):
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        _barrier()
        raise error or CheckpointError(f"saving checkpoint {iteration} failed on another rank (see its log)")
    if rank == 0:
        deleted = run_folder.commit_checkpoint(run_dir, iteration, keep)
        logger.info("saved checkpoint %s%s", run_dir / str(iteration),
                    f" (deleted iterations {deleted})" if deleted else "")
    _barrier()


def _write_model_files(state: TrainState, staging: Path) -> None:
    """Rank 0: the whole DiT in SAT's layout, training_state.pt, and the EMA twin."""
    iteration = state.iteration
    module_state = {k: v.detach().cpu() for k, v in state.module.state_dict().items()}
    run_folder.write_durably(staging / str(iteration) / run_folder.MODEL_FILE,
                             lambda f: torch.save({"module": module_state, "iteration": iteration}, f))
    run_folder.write_durably(staging / str(iteration) / TRAINING_STATE_FILE,
                             lambda f: torch.save(state.record(), f))
    if state.ema is not None:
        (staging / f"{iteration}-ema").mkdir()
        ema_state = state.ema.state_dict(state.module)
        run_folder.write_durably(staging / f"{iteration}-ema" / run_folder.MODEL_FILE,
                                 lambda f: torch.save({"module": ema_state, "iteration": iteration}, f))


def resume_point(run_dir: Path, shape: dict) -> tuple[int, Path]:
    """(iteration, folder) of the run's ``latest`` checkpoint, after checking its files and that
    it was trained with the same world size, micro-batch and accumulation."""
    iteration = run_folder.latest_iteration(run_dir)
    if iteration is None:
        raise CheckpointError(f"cannot resume from {run_dir}: no 'latest' file (not a run folder "
                              "of train_video.py, or no checkpoint was completed)")
    folder = run_dir / str(iteration)
    if not folder.is_dir():
        raise CheckpointError(f"{run_dir / run_folder.LATEST} names iteration {iteration}, but {folder} "
                              "does not exist")
    ema = run_dir / f"{iteration}-ema"
    run_folder.check_checkpoint_files([folder] + ([ema] if ema.is_dir() else []))
    saved = run_folder.read_training_state(folder / TRAINING_STATE_FILE)
    for key, value in shape.items():
        if saved.get(key) != value:
            raise CheckpointError(
                f"cannot resume {run_dir} at iteration {iteration}: it was trained with {key} "
                f"{saved.get(key)}, this run has {value} (the ZeRO optimizer partitions and the data "
                f"order depend on it).  To continue from its weights with a fresh optimizer, start a "
                f"new run with --load {run_dir}")
    return iteration, folder


def restore(state: TrainState, run_dir: Path, folder: Path) -> None:
    """DeepSpeed's optimizer partitions and fp32 master weights, and the EMA, of a checkpoint."""
    path, _ = state.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_module_strict=False,
                                           load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed state missing in {folder / DEEPSPEED_TAG}")
    if state.ema is None:
        return
    ema_file = run_folder.model_file(run_dir, state.iteration, ema=True)
    if not ema_file.is_file():
        logger.warning("%s is missing (the run had no EMA): the EMA starts from the current weights", ema_file)
        return
    saved = load_state_dict(ema_file)
    for name, tensor in state.ema.shadow.items():
        tensor.copy_(saved[name])


# ----------------------------------------------------------------------------------------------
# Per-step records
# ----------------------------------------------------------------------------------------------

class StepClock:
    """Seconds per phase of one step (GPU work synchronised first) and peak memory."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.start = self.mark = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.mark
        self.mark = now

    def add(self, timing: dict) -> None:
        for name, value in timing.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + value

    def peak_gib(self) -> float:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)

    def record(self, samples: int) -> dict:
        total = time.perf_counter() - self.start
        record = {"seconds": round(total, 4), "samples_per_second": round(samples / total, 4)}
        record.update({k: round(v, 4) for k, v in self.seconds.items()})
        if self.device.type == "cuda":
            record["peak_step_gib"] = self.peak_gib()
            record["reserved_gib"] = round(torch.cuda.max_memory_reserved(self.device) / 2**30, 3)
        return record


class RunLog:
    """Rank 0's outputs per step: metrics.jsonl, TensorBoard, the progress bar, a log line every
    ``log_interval`` steps (averaged)."""

    def __init__(self, run_dir: Path, cfg: DictConfig, start: int, enabled: bool):
        self.enabled, self.interval, self.total = enabled, cfg.args.log_interval, cfg.args.train_iters
        self.metrics_path = run_dir / METRICS_FILE
        self.losses: list[float] = []
        self.writer = self.bar = None
        if not enabled:
            return
        if cfg.args.tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start)
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm
        self.bar = tqdm(total=self.total, initial=start, unit="step", desc="training", dynamic_ncols=True)
        self.redirect = logging_redirect_tqdm()  # log lines above the bar, not through it
        self.redirect.__enter__()

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as file:
            file.write(f"{json.dumps(record)}\n")
        step = record["step"]
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "seconds"):
                if record.get(key) is not None:
                    self.writer.add_scalar(f"Train/{key}", record[key], step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        self.losses.append(record["loss"])
        if step % self.interval == 0 or step == self.total:
            logger.info("step %d/%d: loss %.6f (mean of %d), lr %.3e, %.2f s/step", step, self.total,
                        sum(self.losses) / len(self.losses), len(self.losses), record["lr"], record["seconds"])
            self.losses = []

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.redirect.__exit__(None, None, None)
            self.bar.close()


@contextlib.contextmanager
def log_to_file(path: Optional[Path]):
    """Everything logged (ours, SAT's, DeepSpeed's) also goes to ``path`` (train.log) on rank 0."""
    if path is None:
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in sat_compat.THIRD_PARTY_LOGGERS
                                       if not logging.getLogger(n).propagate]
    project = logging.getLogger(__name__.partition(".")[0])  # "tora": its INFO lines belong in the file
    level = project.level
    if project.getEffectiveLevel() > logging.INFO:
        project.setLevel(logging.INFO)
    for log in loggers:
        log.addHandler(handler)
    try:
        yield
    finally:
        for log in loggers:
            log.removeHandler(handler)
        handler.close()
        project.setLevel(level)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def prepare_config(cfg: DictConfig) -> DictConfig:
    """Checked copy of the config; ``args.checkpoint_activations`` (the official key) switches the
    DiT's activation checkpointing."""
    check_training_config(cfg)
    cfg = copy.deepcopy(cfg)
    cfg.model.network_config.params.transformer_args.checkpoint_activations = cfg.args.checkpoint_activations
    return cfg


def open_run_dir(cfg: DictConfig, rank: int) -> tuple[Path, bool]:
    """(run folder, created now): ``args.resume``, or a new unique folder made by rank 0."""
    if cfg.args.resume:
        run_dir = Path(cfg.args.resume)
        if not (run_dir / run_folder.LATEST).is_file():
            raise CheckpointError(f"cannot resume from {run_dir}: no 'latest' file (not a run folder "
                                  "of train_video.py, or no checkpoint was completed)")
        return run_dir, False
    created = run_folder.create_run_dir(cfg.args.save, cfg.args.experiment_name) if rank == 0 else None
    return Path(_broadcast(str(created) if created else None)), True


def write_run_files(cfg: DictConfig, run_dir: Path, start: int, resumed: bool) -> None:
    """Rank 0: training_config.yaml (a resumed run warns about changed settings), metrics.jsonl cut
    back to the checkpoint, the UNTRAINED marker of a run from random weights."""
    config_file = run_dir / CONFIG_FILE
    if resumed and config_file.is_file():
        changed = config_changes(OmegaConf.load(config_file), cfg)
        if changed:
            logger.warning("resuming with settings that differ from the run's %s: %s", CONFIG_FILE,
                           "; ".join(changed))
    run_folder.write_text_durably(config_file, OmegaConf.to_yaml(cfg))
    run_folder.truncate_metrics(run_dir / METRICS_FILE, start)
    load = cfg.args.load
    if not resumed and load and (base_checkpoint(load) / UNTRAINED_MARKER).exists():
        (run_dir / UNTRAINED_MARKER).write_text(
            f"Fine-tuned from the random-weight checkpoint {load} - NOT a trained model.\n")


def data_loader(dataset, cfg: DictConfig, rank: int, world_size: int, micro_batch: int,
                start_micro_batch: int, device: torch.device) -> Iterator[dict]:
    """Endless micro-batches of this rank from micro-batch ``start_micro_batch`` on."""
    sampler = StepBatchSampler(len(dataset), micro_batch, rank, world_size, cfg.args.seed,
                               start_micro_batch=start_micro_batch)
    workers = cfg.args.num_workers
    return iter(DataLoader(EpochKeyed(dataset), batch_sampler=sampler, num_workers=workers,
                           pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None,
                           persistent_workers=False))


@dataclass
class Run:
    """Where a run happens: its processes, folder and fixed settings (nothing here changes per step)."""
    cfg: DictConfig
    device: torch.device
    dtype: torch.dtype
    ds_config: dict
    rank: int
    world_size: int
    run_dir: Path
    created: bool  # the folder was made by this run (removed again if the start fails)

    @property
    def micro_batch(self) -> int:
        return self.ds_config["train_micro_batch_size_per_gpu"]

    @property
    def accumulation(self) -> int:
        return self.ds_config["gradient_accumulation_steps"]

    @property
    def base_lr(self) -> float:
        return self.ds_config["optimizer"]["params"]["lr"]


def start_run(cfg: DictConfig) -> Run:
    """Checked config, device and dtype, DeepSpeed config, processes, run folder."""
    cfg = prepare_config(cfg)
    device = pick_device(cfg.args.device) if cfg.args.device else pick_device(None)
    dtype = training_dtype(cfg, device)
    ds_config = deepspeed_config(cfg, dtype)
    rank, world_size = start_processes(device, ds_config, cfg)
    seed_everything(cfg.args.seed)
    run_dir, created = open_run_dir(cfg, rank)
    return Run(cfg, device, dtype, ds_config, rank, world_size, run_dir, created)


def build_state(run: Run, build: Callable, start: int, folder: Optional[Path]) -> tuple[TrainState, BatchPreparer]:
    """Components, the loss module, the DeepSpeed engine on the official decay groups, and the
    state of checkpoint ``folder`` when resuming."""
    cfg, rank, device = run.cfg, run.rank, run.device
    components = build(cfg, device, run.dtype)
    if folder is not None:
        load_dit_checkpoint(components.dit, folder)  # the whole DiT; DeepSpeed's state follows
    denoiser = DiscreteDenoiser.from_config(cfg.model.denoiser_config)
    loss_fn = VideoDiffusionLoss.from_config(cfg.model.loss_fn_config, denoiser, rank, run.world_size)
    module = ToraTrainingModule(components.dit, loss_fn, cfg.model.trainable_modules)
    module.disable_untrainable_params()
    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=module.to(device), model_parameters=decay_groups(module),
                                           config=run.ds_config, dist_init_required=False)
    ema = EMA(module, cfg.args.ema_decay) if cfg.args.ema_decay > 0 and rank == 0 else None
    state = TrainState(start, engine, module, ema, run.world_size, run.micro_batch, run.accumulation, cfg.args.seed)
    if folder is not None:
        restore(state, run.run_dir, folder)
    return state, BatchPreparer(cfg, components, device)


def train(cfg: DictConfig, build: Callable[[DictConfig, torch.device, torch.dtype], Components] = build_components,
          dataset=None) -> Path:
    """Fine-tune as configured (``sat/train_video.py``) until ``args.train_iters``; returns the run folder.

    ``build(cfg, device, dtype)`` makes the components once torch.distributed is up (default
    :func:`build_components`: the real weights of the config); ``dataset`` replaces the SFT folders
    of ``args.train_data``.
    """
    run = start_run(cfg)
    cfg, args, rank, run_dir = run.cfg, run.cfg.args, run.rank, run.run_dir
    shape = {"world_size": run.world_size, "micro_batch": run.micro_batch, "accumulation": run.accumulation}
    with _remove_on_failed_start(run_dir, run.created, rank) as started, \
            log_to_file(run_dir / "train.log" if rank == 0 else None):
        start, folder = resume_point(run_dir, shape) if args.resume else (0, None)
        if start >= args.train_iters:
            logger.info("%s already reached iteration %d (args.train_iters)", run_dir, start)
            return run_dir
        logger.info("run folder %s%s", run_dir, f", resuming at iteration {start}" if folder else "")
        state, preparer = build_state(run, build, start, folder)
        if dataset is None:
            from .data import SFTDataset
            dataset = SFTDataset(list(args.train_data), cfg.data.params, seed=args.seed,
                                 flows=worker_flows(cfg.motion_from_video))
        batches = data_loader(dataset, cfg, rank, run.world_size, run.micro_batch, start * run.accumulation,
                              run.device)
        if rank == 0:
            write_run_files(cfg, run_dir, start, resumed=folder is not None)
        _barrier()
        started()
        log = RunLog(run_dir, cfg, start, enabled=rank == 0)
        state.engine.train()
        try:
            while state.iteration < args.train_iters:
                lr = learning_rate(state.iteration + 1, run.base_lr, args)
                record = train_step(state, run, batches, preparer, lr)
                log.step(record)
                exiting = bool(args.exit_interval) and state.iteration % args.exit_interval == 0
                finished = state.iteration >= args.train_iters
                if state.iteration % args.save_interval == 0 or (finished and not exiting):
                    save_checkpoint(state, run_dir, args.keep_last_checkpoints, rank, run.device)
                if exiting:  # args.exit_interval: stop here (SAT: no final save)
                    break
        finally:
            log.close()
    return run_dir


def train_step(state: TrainState, run: Run, batches: Iterator[dict], preparer: BatchPreparer, lr: float) -> dict:
    """One optimizer step of ``accumulation`` micro-batches; advances ``state``; returns its
    metrics.jsonl record."""
    step, engine, device = state.iteration, state.engine, run.device  # step: 0-based (RNG, data)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    clock = StepClock(device)
    losses, skipped = [], 0
    for micro in range(state.accumulation):
        batch = next(batches)
        clock.lap("data_s")
        inputs = preparer(batch, StepRandom.for_step(state.seed, step, micro, run.rank, device))
        clock.add(preparer.timing)
        if device.type == "cuda":  # peak of the frozen preprocessing (RAFT, VAE, T5)
            clock.seconds["peak_prepare_gib"] = max(clock.seconds.get("peak_prepare_gib", 0.0), clock.peak_gib())
        clock.mark = time.perf_counter()
        loss = engine(inputs)
        clock.lap("dit_forward_s")
        mean_loss = _mean_over_ranks(loss)
        if not torch.isfinite(mean_loss):  # the same on every rank: all skip together
            skipped += 1
            logger.warning("step %d, micro-batch %d: loss %s, no gradient from it", step + 1, micro, float(mean_loss))
            if state.accumulation == 1:
                break  # no backward, no optimizer step (SAT's rule)
            loss = zero_gradient_loss(state.module)  # keeps DeepSpeed's accumulation in step
        else:
            losses.append(float(mean_loss))
        engine.backward(loss)
        clock.lap("backward_s")
        engine.step()  # at the accumulation boundary: average over ranks, clip, AdamW
        clock.lap("optimizer_s")
    state.iteration += 1
    updated = skipped < state.accumulation
    if state.ema is not None and updated:
        state.ema.update(state.module)
    grad_norm = engine.get_global_grad_norm() if updated else None
    return {"step": state.iteration, "loss": sum(losses) / len(losses) if losses else float("nan"), "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            **clock.record(state.micro_batch * state.accumulation * run.world_size), "skipped": skipped}


def zero_gradient_loss(module: nn.Module) -> Tensor:
    """A loss whose gradient is exactly zero for every trainable parameter: the backward of a
    micro-batch with a non-finite loss while accumulating (DeepSpeed counts micro-batches; a step
    whose micro-batches are all non-finite then applies zero gradients)."""
    return sum((p.sum() * 0.0 for p in module.parameters() if p.requires_grad), torch.zeros(()))


@contextlib.contextmanager
def _remove_on_failed_start(run_dir: Path, created: bool, rank: int):
    """A run folder created by this run is deleted again when the run fails before its first step;
    the body calls the yielded function once the loop is about to start."""
    started = [False]
    try:
        yield lambda: started.__setitem__(0, True)
    except BaseException:
        if created and not started[0] and rank == 0:
            run_folder.remove_unused_run_dir(run_dir)
        raise


run_training = train  # the name callers (scripts, tests) use
