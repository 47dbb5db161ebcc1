"""Data-driven golden cases (reference tensors of the official Tora code).

Everything - shapes, hyper-parameters, tolerances, checkpoint configs - is read from
``$TORA_GOLDEN_DIR/manifest.json`` (default ``../shared/golden`` next to the repository), so a
set with other shapes runs through the same code.  A runner is a function
``run(case: GoldenCase) -> dict[str, Tensor]`` registered for a case-name pattern; it returns the
outputs it computed, named as in the manifest.  ``check_outputs`` applies the manifest rule
``max|got - expected| <= atol + rtol * max|expected|`` to every returned output and requires every
*required* output.
"""
from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def golden_dir() -> Path:
    return Path(os.environ.get("TORA_GOLDEN_DIR", REPO.parent / "shared" / "golden")).resolve()


def load_manifest() -> dict | None:
    path = golden_dir() / "manifest.json"
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


@dataclass
class GoldenCase:
    name: str
    entry: dict  # manifest["cases"][name]
    manifest: dict

    @property
    def root(self) -> Path:
        return golden_dir()

    @property
    def params(self) -> dict:
        return self.entry.get("params", {})

    @cached_property
    def inputs(self) -> dict[str, torch.Tensor]:
        if "inputs_file" not in self.entry:
            return {}
        return load_file(self.root / self.entry["inputs_file"])

    @cached_property
    def expected(self) -> dict[str, torch.Tensor]:
        return load_file(self.root / self.entry["outputs_file"])

    def checkpoint(self, name: str) -> dict:
        """Manifest entry of a checkpoint (path relative to the golden dir, config)."""
        return self.manifest["checkpoints"][name]

    def path(self, relative: str) -> Path:
        return self.root / relative


_RUNNERS: list[tuple[str, Callable[[GoldenCase], dict]]] = []


def runner(*patterns: str):
    """Register ``fn`` as the runner of every case whose name matches one of ``patterns``."""
    def register(fn):
        for p in patterns:
            _RUNNERS.append((p, fn))
        return fn
    return register


def find_runner(name: str):
    for pattern, fn in _RUNNERS:
        if fnmatch.fnmatchcase(name, pattern):
            return fn
    return None


def check_outputs(case: GoldenCase, got: dict[str, torch.Tensor]) -> list[str]:
    """Return a list of failure messages (empty when the case passes)."""
    failures, rows = [], []
    for name, spec in case.entry["outputs"].items():
        if name not in got:
            if spec["required"]:
                failures.append(f"{name}: required output not produced")
            continue
        exp = case.expected[name].double()
        val = got[name].detach().cpu()
        if tuple(val.shape) != tuple(exp.shape):
            failures.append(f"{name}: shape {tuple(val.shape)} != expected {tuple(exp.shape)}")
            continue
        val = val.double()
        scale = exp.abs().max().item() if exp.numel() else 0.0
        err = (val - exp).abs().max().item() if exp.numel() else 0.0
        if torch.isnan(val).any() and not torch.isnan(exp).any():
            err = float("inf")
        exact = spec["atol"] == 0 and spec["rtol"] == 0
        allowed = spec["atol"] + spec["rtol"] * scale
        ok = err == 0.0 if exact else err <= allowed
        rows.append(f"  {name:28s} max_abs_err {err:.3e}  allowed {allowed:.3e}  {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(f"{name}: max|got-expected| = {err:.3e} > allowed {allowed:.3e}")
    unknown = sorted(set(got) - set(case.entry["outputs"]))
    if unknown:
        failures.append(f"runner returned outputs the manifest does not know: {unknown}")
    print(f"case {case.name}:\n" + "\n".join(rows))
    return failures


# Runner modules register themselves on import.
from . import diffusion, dit, pipeline, trajectory, vae  # noqa: E402,F401
