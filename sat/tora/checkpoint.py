"""SAT checkpoint containers: find, load strictly by key, save atomically; build models without memory.

Layouts accepted for ``--load PATH`` (the published download has no ``latest``, official issue #32):

    PATH/latest + PATH/<iteration>/mp_rank_00_model_states.pt     (SAT training output)
    PATH/mp_rank_00_model_states.pt                               (published Tora weights)
    PATH  (the .pt file itself)

The file is ``torch.save({"module": state_dict, ...})``; DiT keys carry ``model.diffusion_model.``.
Loading is strict: missing or unexpected keys fail with a grouped list, except the documented dead
or derivable entries in :data:`OPTIONAL_KEYS`.  Files are read with ``weights_only=True``.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from .errors import ToraError

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
    """Return (model file, iteration or None) for any of the accepted layouts."""
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
    raise CheckpointError(f"no checkpoint in {path}: expected '{path / 'latest'}' or '{direct}'")


def _iteration_of(folder: Path) -> int | None:
    return int(folder.name) if folder.name.isdigit() else None


def load_state_dict(file: str | os.PathLike, entry: str = "module") -> dict[str, torch.Tensor]:
    """Tensors of a SAT container (``{"module": state_dict}``) or of a plain state dict."""
    file = Path(file)
    try:
        data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip archive (legacy format): mmap unsupported
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {file}: {err}") from None
    if isinstance(data, dict) and entry in data and isinstance(data[entry], dict):
        data = data[entry]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{file} does not hold a state dict (nor a '{entry}' entry with one)")
    return data


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
    """Compare key sets and shapes; raise CheckpointError (strict) or return warnings."""
    missing = [k for k in expected if k not in found and not k.endswith(tuple(optional))]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"    {k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in found and found[k].shape != expected[k].shape]
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
    check_keys(expected, state, source, strict=strict)
    with torch.no_grad():
        for key, target in expected.items():
            if key in state:
                target.copy_(state[key])
    if not any(k.endswith("freqs_cos") for k in state):
        reset_derived_buffers(model)


def reset_derived_buffers(model: torch.nn.Module) -> None:
    """Recompute buffers that are a function of the config (the rotary tables)."""
    for module in model.modules():
        if hasattr(module, "reset_rope_tables"):
            module.reset_rope_tables()


def save_checkpoint(state_dict: dict[str, torch.Tensor], folder: str | os.PathLike, iteration: int,
                    extra: dict | None = None, prefix: str = DIT_PREFIX) -> Path:
    """Write ``folder/<iteration>/mp_rank_00_model_states.pt`` and ``folder/latest`` atomically.

    Each file goes to a temporary name in the same folder first and is renamed into place, so a crash
    leaves the previous checkpoint (and ``latest``) intact.
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
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        torch.save(obj, tmp_path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(text)
        tmp_path = Path(tmp.name)
    os.replace(tmp_path, path)


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
