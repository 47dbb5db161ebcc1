"""SAT checkpoint containers: find, load strictly by key, save atomically; build models without memory.

Layouts accepted for ``--load PATH`` (the published download has no ``latest``, official issue #32):

    PATH/latest + PATH/<iteration>/mp_rank_00_model_states.pt     (SAT training output)
    PATH/mp_rank_00_model_states.pt                               (published Tora weights)
    PATH  (the .pt file itself)
    PATH/transformer/ or PATH = config.json + *.safetensors        (diffusers format, tora.diffusers_format)

The file is ``torch.save({"module": state_dict, ...})``; DiT keys carry ``model.diffusion_model.``.
Loading is strict: missing or unexpected keys fail with a grouped list, except the documented dead
or derivable entries in :data:`OPTIONAL_KEYS`.  Files are read with ``weights_only=True``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from .errors import ToraError
from .files import atomic_path, atomic_write_text  # noqa: F401 (atomic_write_text: re-exported)

logger = logging.getLogger(__name__)

MODEL_FILE = "mp_rank_00_model_states.pt"
DIT_PREFIX = "model.diffusion_model."

# Present in the official model but either unused or recomputed from the config; a checkpoint may
# lack them without changing the function the model computes.
OPTIONAL_KEYS = (
    "transformer.position_embeddings.weight",  # SAT's absolute table, never added
    "mixins.pos_embed.pos_embedding",  # I2V learnable table, never added by Tora
    "mixins.pos_embed.freqs_sin",  # rotary tables: a function of the config
    "mixins.pos_embed.freqs_cos",
)


class CheckpointError(ToraError, RuntimeError):
    pass


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A weights file named by the config is missing (the message names the path and the key)."""


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, int | None]:
    """Return (model file, iteration or None) for any of the accepted layouts; for a diffusers folder
    (:mod:`tora.diffusers_format`) the transformer folder itself and None."""
    path = Path(path)
    if path.is_file():
        return path, _iteration_of(path.parent)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} (expected a folder with '{MODEL_FILE}' "
                              f"or 'latest', or the .pt file itself; see README 'Weights')")
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        candidate = path / tag / MODEL_FILE
        if not candidate.is_file():
            raise CheckpointError(f"{latest} names iteration '{tag}', but {candidate} does not exist")
        return candidate, int(tag) if tag.isdigit() else None
    direct = path / MODEL_FILE
    if direct.is_file():
        return direct, _iteration_of(path)
    from .diffusers_format import find_transformer_dir
    diffusers_dir = find_transformer_dir(path)
    if diffusers_dir is not None:
        return diffusers_dir, None
    raise CheckpointError(f"no checkpoint in {path}: expected '{path / 'latest'}' or '{direct}' (SAT), or a "
                          f"diffusers folder ('config.json' + '*.safetensors', or a 'transformer/' subfolder "
                          f"with them)")


def _iteration_of(folder: Path) -> int | None:
    return int(folder.name) if folder.name.isdigit() else None


def load_state_dict(file: str | os.PathLike, entry: str = "module") -> dict[str, torch.Tensor]:
    """Tensors of a SAT container (``{"module": state_dict}``) or of a plain state dict."""
    file = Path(file)
    data = _read_container(file)
    if isinstance(data, dict) and entry in data and isinstance(data[entry], dict):
        data = data[entry]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{file} does not hold a state dict (nor a '{entry}' entry with one)")
    return data


def _read_container(file: Path):
    """``torch.load`` with errors that name the file: empty, truncated (a zip without its directory,
    what an interrupted save or download leaves) or otherwise unreadable."""
    size = file.stat().st_size
    damaged = "an interrupted save or download leaves this; save or download it again"
    if size == 0:
        raise CheckpointError(f"checkpoint {file} is empty (0 bytes): {damaged}")
    if zipfile.is_zipfile(file):  # torch.save's format: memory-mapped, tensors read on demand
        loader = dict(mmap=True)
    else:  # the legacy pickle format, or a zip archive cut short
        loader = {}
    try:
        return torch.load(file, map_location="cpu", weights_only=True, **loader)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not loader:
            raise CheckpointError(f"checkpoint {file} ({size} bytes) is truncated or not a PyTorch "
                                  f"checkpoint ({damaged}): {reason}") from None
        raise CheckpointError(f"cannot read checkpoint {file} ({size} bytes): {reason}") from None


def _group(keys: list[str], limit: int = 4) -> str:
    """'a.3.b', 'a.7.b' -> 'a.*.b (2 keys: a.3.b, a.7.b)' - one line per pattern."""
    groups: dict[str, list[str]] = OrderedDict()
    for key in sorted(keys, key=_natural):
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", key), []).append(key)
    lines = []
    for pattern, members in groups.items():
        shown = ", ".join(members[:limit]) + (", ..." if len(members) > limit else "")
        lines.append(f"    {pattern}  ({len(members)} key{'s' if len(members) > 1 else ''}: {shown})")
    return "\n".join(lines)


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def check_keys(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str,
               optional=OPTIONAL_KEYS, strict: bool = True) -> list[str]:
    """Compare key sets and shapes; raise CheckpointError (strict) or return warnings.

    A lazy ``found`` mapping (a diffusers folder seen under SAT keys) may provide ``shape_of(key)`` (no
    tensor is read) and ``source_name(key)`` (the problems are then listed under the folder's own names).
    """
    shape_of = getattr(found, "shape_of", lambda k: found[k].shape)
    name = getattr(found, "source_name", lambda k: k)
    missing = [name(k) for k in expected if k not in found and not k.endswith(tuple(optional))]
    unexpected = [name(k) for k in found if k not in expected]
    shapes = [f"    {name(k)}: checkpoint {tuple(shape_of(k))} vs model {tuple(expected[k].shape)}"
              for k in expected if k in found and shape_of(k) != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"  missing {len(missing)} key(s):\n{_group(missing)}")
    if unexpected:
        problems.append(f"  unexpected {len(unexpected)} key(s):\n{_group(unexpected)}")
    if shapes:
        problems.append(f"  {len(shapes)} shape mismatch(es) (does the model config fit this "
                        f"checkpoint?):\n" + "\n".join(shapes[:8]))
    if problems and (strict or shapes):
        raise CheckpointError(f"checkpoint {source} does not match the model:\n" + "\n".join(problems))
    return problems


def read_dit_state(path: str | os.PathLike, prefix: str = DIT_PREFIX):
    """(DiT state dict with ``prefix`` stripped, file, iteration) of a checkpoint in any layout.

    Keys outside ``prefix`` (VAE/T5 entries of a whole-engine checkpoint) are dropped.  A file whose
    keys lack the prefix entirely is taken as a bare DiT state dict.
    """
    file, iteration = resolve_checkpoint(path)
    if file.is_dir():  # a diffusers folder (see resolve_checkpoint): SAT keys, read lazily
        from .diffusers_format import read_sat_state
        return (*read_sat_state(file), None)
    state = load_state_dict(file)
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state, file, iteration


def load_dit_checkpoint(model: torch.nn.Module, path: str | os.PathLike, prefix: str = DIT_PREFIX,
                        strict: bool = True) -> int | None:
    """Load DiT weights from a SAT checkpoint into ``model`` (cast to its dtype). Returns the iteration."""
    state, file, iteration = read_dit_state(path, prefix)
    load_into(model, state, str(file), strict=strict)
    return iteration


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True,
              exclude: tuple[str, ...] = ()):
    """Copy ``state`` into ``model`` after checking keys; entries starting with ``exclude`` are left alone
    (neither expected nor loaded)."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(exclude)}
    state = drop_resized_optional(expected, state, source)
    check_keys(expected, state, source, strict=strict)
    with torch.no_grad():
        for key, target in expected.items():
            if key in state:
                target.copy_(state[key])
    if not any(k.endswith("freqs_cos") for k in state):
        reset_derived_buffers(model)


def drop_resized_optional(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str,
                          optional=OPTIONAL_KEYS) -> dict[str, torch.Tensor]:
    """Leave out the :data:`OPTIONAL_KEYS` whose shape differs from the model's: tables of another
    resolution or frame count (the rotary tables are then recomputed from the config)."""
    resized = [k for k, v in state.items() if k.endswith(tuple(optional)) and k in expected
               and v.shape != expected[k].shape]
    if resized:
        logger.info("%s: %s made for another resolution or frame count; recomputed or unused",
                    source, ", ".join(resized))
    return {k: v for k, v in state.items() if k not in resized}


def reset_derived_buffers(model: torch.nn.Module) -> None:
    """Recompute buffers that are a function of the config (the rotary tables)."""
    for module in model.modules():
        if hasattr(module, "reset_rope_tables"):
            module.reset_rope_tables()


def save_checkpoint(state_dict: dict[str, torch.Tensor], folder: str | os.PathLike, iteration: int,
                    extra: dict | None = None, prefix: str = DIT_PREFIX) -> Path:
    """Write ``folder/<iteration>/mp_rank_00_model_states.pt`` and ``folder/latest`` atomically.

    Each file goes to a temporary name in the same folder first, is fsynced and renamed into place
    (mode 0666 minus the umask), so a crash leaves the previous checkpoint (and ``latest``) intact.
    """
    folder = Path(folder)
    target_dir = folder / str(iteration)
    target_dir.mkdir(parents=True, exist_ok=True)
    payload = {"module": {prefix + k: v.detach().cpu() for k, v in state_dict.items()}, "iteration": iteration}
    if extra:
        payload.update(extra)
    atomic_torch_save(payload, target_dir / MODEL_FILE)
    atomic_write_text(folder / "latest", str(iteration))
    return target_dir / MODEL_FILE


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` through a staged temporary: fsynced, umask-respecting, renamed (tora.files)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ----------------------------------------------------------------------------------------------
# Building without memory
# ----------------------------------------------------------------------------------------------

class _DeviceOverride(TorchFunctionMode):
    """Redirect every tensor factory to one device (SAT layers pass ``device=cpu`` explicitly,
    so ``with torch.device("meta")`` alone would still allocate the full model)."""

    FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.randn, torch.rand, torch.arange,
                 torch.tensor, torch.eye, torch.linspace, torch.empty_like, torch.zeros_like,
                 torch.ones_like, torch.randn_like, torch.full_like}

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES:
            kwargs["device"] = self.device
        return func(*args, **kwargs)


@contextlib.contextmanager
def init_on_device(device="meta"):
    """Construct modules with every parameter/buffer on ``device`` (``meta`` = shapes only)."""
    with _DeviceOverride(device), torch.device(device):
        yield


def materialize(model: torch.nn.Module, device, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Give a meta-built model real (uninitialised) storage on ``device``; recompute derived buffers."""
    model = model.to_empty(device=device)
    if dtype is not None:
        model = model.to(dtype)
    reset_derived_buffers(model)
    return model
