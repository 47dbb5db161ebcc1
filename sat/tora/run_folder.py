"""A training run's folder on disk: its creation, durable writes, checkpoints, metrics.

Layout (``<save>/<experiment_name>-MM-DD-HH-MM-SS[-k]/``, or the folder given to ``--resume``)::

    latest                                 last complete checkpoint (the commit point of a save)
    <iter>/mp_rank_00_model_states.pt      the whole DiT, SAT layout: sample_video.py --load <run>
    <iter>/training_state.pt               the run's shape and iteration: what resume checks
    <iter>/deepspeed/                      DeepSpeed's files: ZeRO optimizer partitions + fp32
                                           master weights (one file per rank), trainable weights
    <iter>-ema/mp_rank_00_model_states.pt  the DiT with EMA weights (fp32) when args.ema_decay > 0
    metrics.jsonl                          one line per step (step, loss, lr, grad_norm, times ...)
    training_config.yaml, train.log        the merged config of the run; its log
    tensorboard/                           when args.tensorboard

A save writes into ``.incomplete-<iter>/``, fsyncs every file, renames the folders into place, then
replaces ``latest`` (fsynced before its rename): a crash or a full disk at any point leaves the
previous checkpoint and ``latest`` intact.  Single files are written through ``tora.files`` (staged,
fsynced, created with the process umask: a teammate in the group can read and ``--load`` them).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import torch

from . import files
from .checkpoint import MODEL_FILE, CheckpointError

logger = logging.getLogger(__name__)

LATEST = "latest"
DEEPSPEED_TAG = "deepspeed"  # <iter>/deepspeed/: DeepSpeed's own checkpoint files
TRAINING_STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "training_config.yaml"
STAGING_PREFIX = ".incomplete-"
STAMP_FORMAT = "%m-%d-%H-%M-%S"  # run folder suffix; a -1, -2 ... follows when the name is taken
MAX_NAME_ATTEMPTS = 1000


# ----------------------------------------------------------------------------------------------
# The folder
# ----------------------------------------------------------------------------------------------

def create_run_dir(save: str | os.PathLike, experiment_name: str, now: Optional[datetime] = None) -> Path:
    """A new, empty run folder ``<save>/<name>-MM-DD-HH-MM-SS`` (``-1``, ``-2`` ... when taken).

    Created with ``mkdir`` (exclusive): two runs started in the same second get two folders, and
    an existing folder is never reused.
    """
    parent = Path(save)
    parent.mkdir(parents=True, exist_ok=True)
    base = f"{experiment_name}-{(now or datetime.now()).strftime(STAMP_FORMAT)}"
    for attempt in range(MAX_NAME_ATTEMPTS):
        run_dir = parent / (base if attempt == 0 else f"{base}-{attempt}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise CheckpointError(f"cannot create a run folder {parent / base}: {MAX_NAME_ATTEMPTS} names taken")


def checkpoint_iterations(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in run_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_iteration(run_dir: Path) -> Optional[int]:
    """The iteration ``<run>/latest`` names, or None without one."""
    latest = run_dir / LATEST
    if not latest.is_file():
        return None
    text = latest.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{latest} holds {text!r}, not an iteration number (a damaged run folder; "
                              f"its checkpoints: {checkpoint_iterations(run_dir)})")
    return int(text)


def prune_checkpoints(run_dir: Path, keep: int) -> list[int]:
    """Delete all but the ``keep`` newest checkpoints (and their ``-ema`` twins); never the one
    ``latest`` names.  keep 0 keeps everything.  Returns the deleted iterations."""
    if keep <= 0:
        return []
    latest = latest_iteration(run_dir)
    deleted = []
    for iteration in checkpoint_iterations(run_dir)[:-keep]:
        if iteration == latest:
            continue
        for name in (f"{iteration}-ema", str(iteration)):  # the model folder last
            shutil.rmtree(run_dir / name, ignore_errors=True)
        deleted.append(iteration)
    return deleted


# ----------------------------------------------------------------------------------------------
# Durable writes
# ----------------------------------------------------------------------------------------------

def write_durably(path: Path, write: Callable) -> None:
    """``write(file)`` into a staged file that becomes ``path`` (``tora.files``: fsync, the umask's
    mode, rename, fsync of the folder); a failed write becomes :class:`CheckpointError` naming it."""
    try:
        with files.atomic_path(path) as tmp, open(tmp, "wb") as file:
            write(file)
    except (OSError, RuntimeError) as err:
        raise write_error(err, path) from err


def write_text_durably(path: Path, text: str) -> None:
    write_durably(path, lambda file: file.write(text.encode()))


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder below ``folder`` (DeepSpeed writes its files without)."""
    for root, _, names in os.walk(folder):
        for name in names:
            files.fsync_path(Path(root) / name)
        files.fsync_path(Path(root))


# torch.save to a path reports a failed write as "[enforce fail at inline_container.cc:...]"
TORCH_WRITE_FAILURES = ("inline_container", "file write failed", "PytorchStreamWriter")
LOW_SPACE_BYTES = 64 * 2**20  # below this much free space a failed write is reported as a full disk


def write_error(err: BaseException, path: Path) -> CheckpointError:
    """A failed write as the error a user can act on: "no space left on <folder>" for a full disk."""
    folder = path if path.is_dir() else path.parent
    free = _free_bytes(folder)
    torch_failure = any(s in str(err) for s in TORCH_WRITE_FAILURES)
    if files.disk_full(folder, err) or (torch_failure and free is not None and free < LOW_SPACE_BYTES):
        return CheckpointError(f"no space left on {folder} while writing {path.name} "
                               f"({_mib(free)} free): free some space and resume the run")
    if isinstance(err, OSError) or torch_failure:
        return CheckpointError(f"cannot write {path}: {err}")
    raise err


def _free_bytes(folder: Path) -> Optional[int]:
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


def _mib(size: Optional[int]) -> str:
    return "unknown" if size is None else f"{size / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------------------------
# Committing and reading checkpoints
# ----------------------------------------------------------------------------------------------

def staging_dir(run_dir: Path, iteration: int) -> Path:
    return run_dir / f"{STAGING_PREFIX}{iteration}"


def commit_checkpoint(run_dir: Path, iteration: int, keep: int) -> list[int]:
    """Move the fsynced ``.incomplete-<iter>/`` folders into place, then point ``latest`` at them
    (the commit point), then prune to ``keep``.  Returns the deleted iterations."""
    staging = staging_dir(run_dir, iteration)
    fsync_tree(staging)
    for name in sorted(os.listdir(staging), key=lambda n: n.isdigit()):  # <iter>-ema first
        target = run_dir / name
        if target.exists():  # from a run that died between these renames and `latest`
            shutil.rmtree(target)
        os.replace(staging / name, target)
    files.fsync_path(run_dir)
    write_text_durably(run_dir / LATEST, str(iteration))
    staging.rmdir()
    return prune_checkpoints(run_dir, keep)


def check_checkpoint_files(folders: list[Path]) -> None:
    """Every ``.pt`` file below ``folders`` is a complete torch archive; else an error naming it."""
    for folder in folders:
        for file in sorted(folder.rglob("*.pt")):
            size = file.stat().st_size
            if size == 0:
                raise CheckpointError(f"checkpoint file {file} is empty (0 bytes): the save that wrote it "
                                      f"did not finish.  {_earlier(folder)}")
            if not zipfile.is_zipfile(file):
                raise CheckpointError(f"checkpoint file {file} is truncated or corrupted ({size} bytes, "
                                      f"not a complete torch archive).  {_earlier(folder)}")


def _earlier(folder: Path) -> str:
    run_dir = folder.parent
    others = [i for i in checkpoint_iterations(run_dir) if str(i) != folder.name.removesuffix("-ema")]
    if not others:
        return "The run has no other checkpoint."
    return (f"Other checkpoints of the run: {others}; to resume from one, write its number into "
            f"{run_dir / LATEST}.")


def read_training_state(file: Path) -> dict:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: {file.parent} is not a complete checkpoint of "
                              "train_video.py") from None
    except Exception as err:
        raise CheckpointError(f"cannot read {file}: {err}") from None


# ----------------------------------------------------------------------------------------------
# metrics.jsonl
# ----------------------------------------------------------------------------------------------

def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics file.  A last line cut off (power loss, full disk) is dropped with
    a warning; a bad line elsewhere is an error naming the file and line."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                logger.warning("%s: dropped its last line %d, cut off (%s)", path, number, err)
                break
            raise CheckpointError(f"{path}, line {number}: not a JSON record ({err})") from None
    return records


def truncate_metrics(path: Path, iteration: int) -> None:
    """Keep the records of steps <= ``iteration`` (a resumed run continues one consistent curve)."""
    if path.exists():
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= iteration]
        write_text_durably(path, "".join(json.dumps(r) + "\n" for r in kept))


def remove_unused_run_dir(run_dir: Path) -> None:
    """Delete a run folder that never completed a checkpoint (a failed start)."""
    if run_dir.is_dir() and not (run_dir / LATEST).exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        logger.info("removed %s: the run stopped before its first checkpoint", run_dir)


def model_file(run_dir: Path, iteration: int, ema: bool = False) -> Path:
    return run_dir / (f"{iteration}-ema" if ema else str(iteration)) / MODEL_FILE
