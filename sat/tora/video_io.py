"""Video files: the project's one mp4 writer (sampling outputs, example clips, tests) and reader (evaluation)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg
import imageio
import numpy as np

from .files import OutputError, atomic_path, disk_full, no_space_error

STDERR_TAIL_CHARS = 2000  # how much of ffmpeg's own message an error quotes


def encode_mp4(path: Path, frames: np.ndarray, fps: float, crf: int = 18) -> None:
    """uint8 RGB frames [F, H, W, 3] (even H and W) -> H.264 mp4 at ``path`` (yuv420p, libx264).

    ffmpeg reads the raw frames from a pipe; its exit status is checked, so a failed encode (a full
    disk, a killed encoder) is an error instead of a broken file.  x264 runs single-threaded so that
    the bytes do not depend on thread scheduling.
    """
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    count, height, width, channels = frames.shape
    if channels != 3 or height % 2 or width % 2:
        raise ValueError(f"write_mp4 needs RGB frames of even height and width, got {frames.shape}")
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
               "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), "-threads", "1",
               "-f", "mp4", str(path)]
    result = subprocess.run(command, input=frames.tobytes(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip()[-STDERR_TAIL_CHARS:]
        if disk_full(path.parent) or "No space left" in message:
            raise no_space_error(path.parent)
        raise OutputError(f"ffmpeg failed (exit {result.returncode}) writing {path}: {message}")


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18) -> None:
    """Encode to a temporary name in the same folder, fsync, rename into place (see tora.files): a
    crash or a failed encode never leaves a truncated video under the final name, nor a temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        encode_mp4(tmp, frames, fps, crf)


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
