"""Log set-up of the entry scripts: the project's lines at INFO, the libraries' chatter below it.

SAT ("initializing model parallel", "LOCAL_WORLD_SIZE", "fallback to Pytorch checkpointing"),
DeepSpeed ("Setting accelerator to CPU"), transformers (its weight-loading bar) and torch's
``torch.jit.script`` deprecation speak on every run without telling a user anything.  Their settings
are environment variables read when the libraries are imported, so :func:`quiet_libraries` must run
first; a variable already set by the user wins (``SAT_LOGLEVEL=INFO`` brings SAT's lines back).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

LIBRARY_ENVIRONMENT = {
    "SAT_LOGLEVEL": "WARNING",  # sat.helpers.configure_logging
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bar
}


def quiet_libraries() -> None:
    """Call before importing SAT, DeepSpeed or transformers."""
    for name, value in LIBRARY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if "DS_ACCELERATOR" not in os.environ:
        import torch
        if not torch.cuda.is_available():  # DeepSpeed would warn that it fell back to the CPU
            os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)


def setup_logging(level: int = logging.INFO) -> None:
    """The project's log format; SAT's logger keeps its own handler (no double lines)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("sat").propagate = False


@contextlib.contextmanager
def native_stderr_silenced():
    """Silence what C libraries print straight to file descriptor 2 (ffmpeg and decord report a clip
    they cannot read there) for the duration; the caller reports the problem in its own words."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
