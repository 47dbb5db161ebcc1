"""Video files: the project's one mp4 writer (sampling outputs, example clips, tests) and reader (evaluation)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import imageio.v2 as imageio
import numpy as np


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18) -> None:
    """uint8 RGB frames [F, H, W, 3] (even H and W) -> H.264 mp4 (yuv420p, libx264 via imageio-ffmpeg).

    Written to a temporary name in the same folder and renamed into place, so a crash never leaves a
    truncated video under the final name; x264 runs single-threaded so that the bytes do not depend on
    thread scheduling.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.", suffix=".mp4", delete=False) as f:
        tmp = Path(f.name)
    try:
        with imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=2, pixelformat="yuv420p",
                                ffmpeg_params=["-crf", str(crf), "-threads", "1"],
                                ffmpeg_log_level="error") as writer:
            for frame in frames:
                writer.append_data(np.ascontiguousarray(frame))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_mp4(path: str | Path) -> np.ndarray:
    """Every frame of a video file -> uint8 RGB [F, H, W, 3] (imageio-ffmpeg)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    with imageio.get_reader(path, format="FFMPEG") as reader:
        frames = [np.asarray(frame) for frame in reader]
    if not frames:
        raise ValueError(f"{path} holds no frame")
    return np.stack(frames)
