"""Fine-tuning clips (spec 7.2): the official SFT folder layout and frame sampling, made robust.

Layout of one data folder (several folders are concatenated)::

    <data_dir>/videos/<rel>/<name>.mp4      a clip (any depth)
    <data_dir>/labels/<rel>/<name>.txt      its caption: the first line (missing file -> "")

    dataset = SFTDataset(["data/a", "data/b"], cfg.data.params, seed=1234)
    dataset.set_epoch(epoch)     # per-item randomness is a function of (seed, epoch, index)
    item = dataset[i]            # mp4 [F, 3, H, W] float in [-1, 1], txt, num_frames, fps

Same sampling, crop and item as the official ``data_video.SFTDataset``; the differences fix spec
10.12: the caption path swaps only the layout folder (not every "videos" or ".mp4" in the path) and
an empty caption file gives "" (official: IndexError); the random window start comes from a
generator seeded per item instead of the global ``random`` (whose float bounds crash on Python
3.12); an unusable clip is logged once and replaced by other clips a bounded number of times
(official: retried forever with random earlier-successful indices).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import decord
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .errors import ToraError
from .logs import native_stderr_silenced
from tora.config import ConfigError, DataParams

logger = logging.getLogger(__name__)

# Purposes of the per-item random streams (see SFTDataset._rng).
_FRAMES_STREAM, _REPLACEMENT_STREAM = 0, 1


class DataError(ToraError, RuntimeError):
    """A data folder or item that cannot be used; the message names the path."""


class UnusableClip(Exception):
    """One clip cannot give an item (unreadable, corrupt or too short); it gets replaced."""


# ----------------------------------------------------------------------------------------------
# Folder layout
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clip:
    video: Path
    caption: str


def caption_path(data_dir: Path, video: Path) -> Path:
    """``<data_dir>/labels/<rel>.txt`` for ``<data_dir>/videos/<rel>.mp4``.  Built from the relative
    path: the official string replacement also renamed any other "videos"/".mp4" in the path."""
    relative = video.relative_to(data_dir / "videos")
    return data_dir / "labels" / relative.with_suffix(".txt")


def read_caption(path: Path) -> str:
    """First line of a caption file ("" for an empty file)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0] if lines else ""


def find_clips(data_dir: str | Path) -> list[Clip]:
    """All clips of one data folder in a fixed (sorted) order, captions read once."""
    data_dir = Path(data_dir)
    videos_dir = data_dir / "videos"
    if not videos_dir.is_dir():
        raise DataError(f"data folder {data_dir} has no 'videos' folder "
                        f"(expected {data_dir}/videos/**/*.mp4 and {data_dir}/labels/**/*.txt)")
    videos = sorted(path for path in videos_dir.rglob("*.mp4") if path.is_file())
    if not videos:
        raise DataError(f"data folder {data_dir} has no .mp4 clip under {videos_dir}")
    clips, missing = [], []
    for video in videos:
        label = caption_path(data_dir, video)
        if not label.is_file():
            missing.append(label)
        clips.append(Clip(video, read_caption(label) if label.is_file() else ""))
    if missing:
        logger.warning("%d of %d clips in %s have no caption file (e.g. %s); using empty captions",
                       len(missing), len(videos), data_dir, missing[0])
    return clips


# ----------------------------------------------------------------------------------------------
# Frame sampling (official rules)
# ----------------------------------------------------------------------------------------------

def sample_frame_indices(num_source_frames: int, source_fps: float, params: DataParams,
                         rng: np.random.Generator) -> list[int]:
    """Source frame indices of one item (before padding): the official rules of spec 7.2.

    n source frames at f fps; s = skip_frms_num frames are ignored at both ends; F = max_num_frames:
      (a) the n - 2s frames last longer than F frames at ``params.fps`` and f >= fps: a random
          window lasting F frames at fps, every step-th frame;
      (b) else n - 2s > F: every step-th frame from s, spread over the whole clip;
      (c) else the longest 4k+1 run of consecutive frames from s (the VAE needs 4k+1 frames).
    Each gives at most F indices.  UnusableClip when (c) gives fewer than ``min_num_frames``.
    """
    n, f = num_source_frames, source_fps
    skip, count = int(params.skip_frms_num), params.max_num_frames
    if (n - 2 * skip) / f * params.fps > count and f >= params.fps:  # (a)
        span = int(count / params.fps * f)  # source frames lasting `count` frames at params.fps
        start = int(rng.integers(skip, n - skip - span, endpoint=True))
        # Official integer step: unless f is a multiple of fps the sampled rate f/step exceeds fps
        # (12 fps: step 1, the item plays 1.5x slower than real time at 8 fps).
        step = span // count
        return list(range(start, start + span, step))[:count]
    if n - 2 * skip > count:  # (b); f < fps, or too few seconds: the step again sets the rate
        step = (n - 2 * skip) // count
        return list(range(skip, n - skip, step))[:count]
    usable = n - 2 * skip  # (c)
    run = (usable - 1) // 4 * 4 + 1 if usable > 0 else 0
    if run < params.min_num_frames:
        raise UnusableClip(f"too short: {n} frames, {usable} after skipping {skip} at both ends, "
                           f"need a run of at least data.params.min_num_frames = "
                           f"{params.min_num_frames}")
    return list(range(skip, skip + run))


def pad_with_last_frame(frames: Tensor, num_frames: int) -> Tensor:
    """[n, ...] -> [num_frames, ...] by repeating the last frame (official; n <= num_frames)."""
    padding = frames[-1:].expand(num_frames - len(frames), *frames.shape[1:])
    return torch.cat([frames, padding])


# ----------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------

def resize_center_crop(frames: Tensor, size: Sequence[int]) -> Tensor:
    """uint8 [F, 3, h, w] -> uint8 [F, 3, H, W] for size (H, W): bicubic resize keeping the aspect
    so that the frame covers H x W, then the centre crop (official ``reshape_mode="center"``)."""
    height, width = size
    h, w = frames.shape[-2:]
    if w / h > width / height:  # wider than the target: fit the height, crop the sides
        resized_size = [height, int(w * height / h)]
    else:  # fit the width, crop top and bottom
        resized_size = [int(h * width / w), width]
    # antialias=True is torchvision's default that the official code ran with.
    resized = TF.resize(frames, resized_size, InterpolationMode.BICUBIC, antialias=True)
    top, left = (resized_size[0] - height) // 2, (resized_size[1] - width) // 2
    return resized[..., top:top + height, left:left + width]


def to_model_range(frames: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]: (v - 127.5) / 127.5, as the official dataset."""
    return (frames.float() - 127.5) / 127.5


# ----------------------------------------------------------------------------------------------
# Video files
# ----------------------------------------------------------------------------------------------

def read_clip_frames(path: Path, params: DataParams, rng: np.random.Generator) -> Tensor:
    """The sampled frames of one mp4 (decord), uint8 [n, 3, h, w], n <= max_num_frames."""
    try:
        with native_stderr_silenced():  # decord's own error lines: the UnusableClip warning says it
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        num_source_frames, source_fps = len(reader), reader.get_avg_fps()
    except (RuntimeError, decord.DECORDError) as err:
        raise UnusableClip(f"cannot open: {str(err).splitlines()[0]}") from None
    if not (math.isfinite(source_fps) and source_fps > 0):
        raise UnusableClip(f"invalid frame rate {source_fps}")
    indices = sample_frame_indices(num_source_frames, source_fps, params, rng)
    try:
        with native_stderr_silenced():
            frames = reader.get_batch(indices).asnumpy()  # [n, h, w, 3]
    except (RuntimeError, decord.DECORDError) as err:
        raise UnusableClip(f"cannot decode: {str(err).splitlines()[0]}") from None
    return torch.from_numpy(frames).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------

def check_params(params: DataParams) -> None:
    """Reject data settings the sampling rules cannot honour, naming the config key."""
    def fail(key: str, why: str):
        raise ConfigError(f"data.params.{key} = {getattr(params, key)!r}: {why}")

    if len(params.video_size) != 2 or min(params.video_size) < 1:
        fail("video_size", "expected [height, width] of positive sizes")
    if not params.fps > 0:
        fail("fps", "must be positive")
    if params.max_num_frames < 1 or (params.max_num_frames - 1) % 4:
        fail("max_num_frames", "must be 4k+1 (the VAE compresses time by 4 after the first frame)")
    if params.skip_frms_num < 0 or params.skip_frms_num != int(params.skip_frms_num):
        fail("skip_frms_num", "must be a whole number >= 0")
    if not 1 <= params.min_num_frames <= params.max_num_frames:
        fail("min_num_frames", "must be in [1, max_num_frames]")
    if params.max_retries < 0:
        fail("max_retries", "must be >= 0")


class SFTDataset(Dataset):
    """Clips of one or more data folders as training items (spec 7.2).

    Item: ``mp4`` float [max_num_frames, 3, H, W] in [-1, 1] (H, W = ``video_size``), ``txt`` the
    caption, ``num_frames`` the real frames before padding, ``fps`` the configured rate (official).

    Randomness (the window start, the replacement order) is a function of (seed, epoch, index):
    items are reproducible in any DataLoader worker and after a resume.  Call ``set_epoch`` before
    each epoch's iterator is created (workers receive a copy of the dataset at that moment).

    An unusable clip is logged once (per process) and replaced by other clips in an order fixed by
    (seed, epoch, index); clips already known to be unusable are passed over without a retry.
    After ``max_retries`` failed replacements, or when no clip is left, the item is a DataError.
    """

    def __init__(self, data_dirs: str | Path | Sequence[str | Path], params: DataParams,
                 seed: int = 0, flows: Optional[Callable[[Tensor], Tensor]] = None):
        """``flows``: an optical-flow function of a clip [F, 3, H, W] in [-1, 1] -> [F-1, H, W, 2] run
        on every item in the loader's worker processes (a CPU estimator such as
        ``tracking.farneback_flows``); the item then holds ``flows`` (float16)."""
        check_params(params)
        self.flows = flows
        if seed < 0:
            raise ConfigError(f"SFTDataset seed must be >= 0, got {seed} (args.seed)")
        if isinstance(data_dirs, (str, Path)):
            data_dirs = [data_dirs]
        self.data_dirs = [Path(data_dir) for data_dir in data_dirs]
        self.clips = [clip for data_dir in self.data_dirs for clip in find_clips(data_dir)]
        self.params = params
        self.seed = seed
        self.epoch = 0
        self._unusable: set[int] = set()  # clip indices found unusable by this process

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        failures = 0
        for clip_index in self._candidates(index):
            if clip_index in self._unusable:
                continue
            clip = self.clips[clip_index]
            try:
                return self._item(clip, self._rng(index, _FRAMES_STREAM))
            except UnusableClip as err:
                self._unusable.add(clip_index)
                logger.warning("skipping clip %s: %s", clip.video, err)
                failures += 1
                if failures > self.params.max_retries:
                    raise DataError(
                        f"item {index}: {failures} clips in a row were unusable (last "
                        f"{clip.video}: {err}); giving up after data.params.max_retries = "
                        f"{self.params.max_retries}") from None
        raise DataError(f"no usable clip in {', '.join(map(str, self.data_dirs))}: all {len(self)} "
                        f"clips are unreadable or too short (see the warnings above)")

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index, stream])

    def _candidates(self, index: int) -> Iterator[int]:
        """The requested clip, then every other clip in an order fixed by (seed, epoch, index)."""
        yield index
        order = self._rng(index, _REPLACEMENT_STREAM).permutation(len(self))
        yield from (int(clip_index) for clip_index in order if clip_index != index)

    def _item(self, clip: Clip, rng: np.random.Generator) -> dict:
        frames = read_clip_frames(clip.video, self.params, rng)  # uint8 [n, 3, h, w]
        frames = resize_center_crop(frames, self.params.video_size)  # uint8 [n, 3, H, W]
        video = to_model_range(pad_with_last_frame(frames, self.params.max_num_frames))
        item = {"mp4": video, "txt": clip.caption, "num_frames": len(frames),
                "fps": float(self.params.fps), "clip": str(clip.video)}
        if self.flows is not None:
            item["flows"] = self.flows(video).to(torch.float16)
        return item
