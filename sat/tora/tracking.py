"""Motion conditioning from training videos (spec 7.3): RAFT optical flow between consecutive frames,
then either the dense flow (stage 1) or the flow along a few tracked keypoints (stage 2).

    cfg = config.motion_from_video
    raft = load_raft(cfg, device)                        # or None with flow_estimator: farneback
    motion_video = motion_video_from_clip(video, raft, cfg, config.trajectory, generator)  # [1, 3, F, H, W]
    motion_flow = video_motion_flow(video, raft, cfg, generator)       # [F, H, W, 2] (RAFT, unblurred)

(the first is the training's motion input: the point files' path of ``tora.trajectory`` for the
sparse stage), or step by step:

    flows = clip_flows(raft, video, cfg)                # [F-1, H, W, 2] (RAFT or Farneback)
    dense = dense_motion_flow(flows)                    # [F, H, W, 2]  (stage "dense")
    tracks = track_keypoints(flows, cfg, generator)     # [F, N, 2]     (stage "sparse")
    sparse = sparse_flow_from_tracks(tracks, H, W)      # [F, H, W, 2]

Without weights, for evaluation and motion transfer: ``track_points_lk(frames, points)`` (OpenCV
pyramidal Lucas-Kanade with a forward-backward check) -> tracks [F, N, 2], visible [F, N].

One flow convention throughout, shared with the trajectory point files (spec 1.5): a motion flow has
one frame per video frame; frame t+1 holds the motion from frame t to frame t+1 as (dx, dy) pixels,
located at frame t's pixels; frame 0 is zero.  Points are (x, y) with x the column.

The sparse flow returned here is not blurred yet: the Gaussian blur and the flow -> RGB step belong
to ``tora.trajectory`` and are shared with inference.
"""
from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.optical_flow import Raft_Large_Weights, Raft_Small_Weights, raft_large, raft_small

from tora.checkpoint import CheckpointNotFoundError
from tora.config import ConfigError, MotionFromVideoConfig
from tora.trajectory import flow_to_rgb, rgb_to_video, tracks_to_video

# config name -> (torchvision builder, torchvision's published weights: the file to download)
RAFT_VARIANTS = {
    "raft_large": (raft_large, Raft_Large_Weights.C_T_SKHT_V2),  # = Raft_Large_Weights.DEFAULT (official)
    "raft_small": (raft_small, Raft_Small_Weights.C_T_V2),  # = Raft_Small_Weights.DEFAULT
}


# ----------------------------------------------------------------------------------------------
# RAFT
# ----------------------------------------------------------------------------------------------

def load_raft(cfg: MotionFromVideoConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The RAFT model named by ``cfg.raft_model`` with the local weights ``cfg.raft_weights``,
    frozen and in eval mode.  Nothing is downloaded: a missing file is an error naming the URL."""
    if cfg.raft_model not in RAFT_VARIANTS:
        raise ConfigError(f"unknown motion_from_video.raft_model {cfg.raft_model!r}; "
                          f"choose one of {list(RAFT_VARIANTS)}")
    build, published = RAFT_VARIANTS[cfg.raft_model]
    path = Path(cfg.raft_weights)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"RAFT weights not found at {path} (motion_from_video.raft_weights). Download torchvision's "
            f"{published} from {published.url} and put it there (e.g. ckpts/raft/{published.url.rsplit('/', 1)[1]}).")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = build(weights=None, progress=False)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ConfigError(f"{path} does not hold {cfg.raft_model} weights (motion_from_video.raft_weights "
                          f"must match motion_from_video.raft_model): {str(err).splitlines()[0]}") from None
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def raft_flows(raft: nn.Module, video: Tensor, cfg: MotionFromVideoConfig) -> Tensor:
    """Optical flow between consecutive frames of one clip.

    video: [F, 3, H, W] in [-1, 1] (the training dataset's range; H and W multiples of 8 and at
    least 128, RAFT's limits, which it reports itself).  The
    official code converts the clip to [0, 1] and applies RAFT's preset normalisation, which maps it
    straight back to [-1, 1], so the clip goes in as it is.
    Returns [F-1, H, W, 2] float32 (dx, dy) pixels on the RAFT model's device: flow t moves frame
    t's pixels to frame t+1 (the last of ``cfg.raft_iterations`` estimates).
    """
    if video.ndim != 4 or video.shape[1] != 3 or video.shape[0] < 2:
        raise ValueError(f"expected a clip [F >= 2, 3, H, W], got {tuple(video.shape)}")
    frames = video.to(next(raft.parameters()).device, torch.float32)
    num_pairs = len(frames) - 1
    flows = []  # per batch of pairs: [pairs, 2, H, W]
    for start in range(0, num_pairs, cfg.raft_batch_pairs):
        stop = min(start + cfg.raft_batch_pairs, num_pairs)
        estimates = raft(frames[start:stop], frames[start + 1:stop + 1], num_flow_updates=cfg.raft_iterations)
        flows.append(estimates[-1])
    return torch.cat(flows).permute(0, 2, 3, 1).contiguous()


# ----------------------------------------------------------------------------------------------
# Weight-free flow: OpenCV Farneback
# ----------------------------------------------------------------------------------------------

def _gray_frames(video: Tensor) -> np.ndarray:
    """[F, 3, H, W] in [-1, 1] -> [F, H, W] uint8 grey frames (OpenCV's input)."""
    rgb = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    rgb = rgb.permute(0, 2, 3, 1).numpy()
    return np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in rgb])


def farneback_flows(video: Tensor, cfg: MotionFromVideoConfig) -> Tensor:
    """Optical flow between consecutive frames without learned weights (OpenCV's Farneback).

    video: [F, 3, H, W] in [-1, 1].  Returns [F-1, H, W, 2] float32 (dx, dy) pixels on the CPU, the
    convention of :func:`raft_flows`.  The frame pairs run in ``cfg.farneback.threads`` threads
    (OpenCV releases the GIL).  For clips where RAFT's weights are not at hand, and for the
    synthetic training clips, whose flat shapes it follows well.
    """
    if video.ndim != 4 or video.shape[1] != 3 or video.shape[0] < 2:
        raise ValueError(f"expected a clip [F >= 2, 3, H, W], got {tuple(video.shape)}")
    gray = _gray_frames(video)
    fb = cfg.farneback

    def pair_flow(t: int) -> np.ndarray:
        return cv2.calcOpticalFlowFarneback(gray[t], gray[t + 1], None, fb.pyr_scale, fb.levels, fb.winsize,
                                            fb.iterations, fb.poly_n, fb.poly_sigma, 0)

    with ThreadPoolExecutor(max_workers=max(1, fb.threads)) as pool:
        flows = list(pool.map(pair_flow, range(len(gray) - 1)))
    return torch.from_numpy(np.stack(flows)).float()


# ----------------------------------------------------------------------------------------------
# Dense stage
# ----------------------------------------------------------------------------------------------

def dense_motion_flow(flows: Tensor) -> Tensor:
    """[F-1, H, W, 2] consecutive-frame flows -> [F, H, W, 2] motion flow with a zero frame 0."""
    return torch.cat([torch.zeros_like(flows[:1]), flows])


# ----------------------------------------------------------------------------------------------
# Sparse stage: keypoints
# ----------------------------------------------------------------------------------------------

def keypoint_candidates(height: int, width: int, stride: int, generator: torch.Generator) -> Tensor:
    """One uniformly random pixel per ``stride`` x ``stride`` cell of the frame: [M, 2] long (x, y).

    Official: grid points every ``stride`` pixels plus a random offset in [0, stride-1]^2.  Cells cut
    by the right/bottom border draw only inside the frame (the official offset could leave it).
    """
    if stride < 1:
        raise ConfigError(f"motion_from_video.grid_stride must be >= 1, got {stride}")
    cell_y, cell_x = torch.meshgrid(torch.arange(0, height, stride), torch.arange(0, width, stride), indexing="ij")
    cell_origin = torch.stack([cell_x, cell_y], dim=-1).reshape(-1, 2)  # [M, 2] (x, y)
    cell_size = (torch.tensor([width, height]) - cell_origin).clamp(max=stride)  # [M, 2]
    offset = (torch.rand(cell_origin.shape, generator=generator) * cell_size).long()
    return cell_origin + offset


def draw_weighted(weights: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Indices of ``count`` entries drawn without replacement with probability proportional to
    ``weights`` [M] (>= 0).  Where the official code crashes (spec 10.7): all-zero weights (a static
    first frame pair, 0/0) draw uniformly; fewer positive weights than ``count`` take all of them."""
    weights = weights.detach().float().cpu()  # the generator is a CPU generator
    positive = weights > 0
    if positive.any():
        count = min(count, int(positive.sum()))
    else:
        weights = torch.ones_like(weights)
        count = min(count, len(weights))
    return torch.multinomial(weights, count, replacement=False, generator=generator)


def sample_keypoints(first_flow: Tensor, cfg: MotionFromVideoConfig, generator: torch.Generator) -> Tensor:
    """Keypoints to track, drawn where frame 0 moves: [N, 2] long (x, y) on ``first_flow``'s device.

    first_flow: [H, W, 2], the flow from frame 0 to frame 1.  N is uniform in
    [cfg.min_points, cfg.max_points] (fewer if fewer grid cells move), each grid candidate weighted
    by its flow magnitude.
    """
    if not 1 <= cfg.min_points <= cfg.max_points:
        raise ConfigError(f"need 1 <= motion_from_video.min_points <= motion_from_video.max_points, "
                          f"got {cfg.min_points} and {cfg.max_points}")
    height, width, _ = first_flow.shape
    candidates = keypoint_candidates(height, width, cfg.grid_stride, generator).to(first_flow.device)
    speed = first_flow[candidates[:, 1], candidates[:, 0]].norm(dim=-1)  # [M]
    count = int(torch.randint(cfg.min_points, cfg.max_points + 1, (), generator=generator))
    chosen = draw_weighted(speed, count, generator).to(first_flow.device)
    return candidates[chosen]


# ----------------------------------------------------------------------------------------------
# Sparse stage: tracking
# ----------------------------------------------------------------------------------------------

def _flow_at_pixel(flow: Tensor, position: Tensor) -> Tensor:
    """Official lookup: the flow at the position's pixel, truncated toward zero (int()).  [N, 2]"""
    pixel = position.long()
    return flow[pixel[:, 1], pixel[:, 0]].trunc()


def _flow_bilinear(flow: Tensor, position: Tensor) -> Tensor:
    """Flow [H, W, 2] bilinearly interpolated at sub-pixel (x, y) positions [N, 2] -> [N, 2]."""
    height, width, _ = flow.shape
    size = torch.tensor([width - 1, height - 1], dtype=position.dtype, device=position.device).clamp(min=1)
    grid = (position / size * 2 - 1).view(1, 1, -1, 2)  # align_corners=True: -1/+1 = first/last pixel
    sampled = F.grid_sample(flow.permute(2, 0, 1)[None], grid, mode="bilinear", align_corners=True)
    return sampled[0, :, 0].T  # [2, N] -> [N, 2]


FLOW_LOOKUP = {"official": _flow_at_pixel, "subpixel": _flow_bilinear}


def track_points(flows: Tensor, start: Tensor, mode: str) -> Tensor:
    """Follow points through a clip: [F-1, H, W, 2] flows, [N, 2] (x, y) start -> [F, N, 2] float32.

    Each step moves every point by the flow at its position, then clamps it to the frame.
    mode "official": integer pixel positions moved by the truncated flow (points slower than
    1 px/frame never move, spec 10.6); "subpixel": positions stay fractional, flow sampled bilinearly.
    """
    if mode not in FLOW_LOOKUP:
        raise ConfigError(f"unknown motion_from_video.tracking {mode!r}; choose one of {list(FLOW_LOOKUP)}")
    flow_at = FLOW_LOOKUP[mode]
    _, height, width, _ = flows.shape
    last_pixel = torch.tensor([width - 1, height - 1], dtype=torch.float32, device=flows.device)
    position = start.to(flows.device, torch.float32)
    track = [position]
    for flow in flows:
        position = torch.minimum((position + flow_at(flow, position)).clamp(min=0), last_pixel)
        track.append(position)
    return torch.stack(track)


def track_keypoints(flows: Tensor, cfg: MotionFromVideoConfig, generator: torch.Generator) -> Tensor:
    """Keypoints sampled on the first flow (``sample_keypoints``), tracked through all flows:
    [F-1, H, W, 2] -> [F, N, 2] float32 (x, y) pixel positions per frame."""
    return track_points(flows, sample_keypoints(flows[0], cfg, generator), cfg.tracking)


def sparse_flow_from_tracks(tracks: Tensor, height: int, width: int) -> Tensor:
    """Rasterise tracks [F, N, 2] into an (unblurred) motion flow [F, H, W, 2].

    Frame t+1 holds, at the pixel of each point in frame t (nearest pixel), the point's displacement
    from frame t to t+1; everything else, and frame 0, is zero.  Later points overwrite earlier ones
    at the same pixel, as in the official loop.
    """
    num_frames, num_points, _ = tracks.shape
    motion_flow = tracks.new_zeros(num_frames, height, width, 2)
    pixel = tracks[:-1].round().long()  # [F-1, N, 2] where step t is written
    step = tracks[1:] - tracks[:-1]  # [F-1, N, 2] displacement t -> t+1
    target_frame = torch.arange(1, num_frames, device=tracks.device)
    for point in range(num_points):  # one point at a time keeps "later overwrites" deterministic
        motion_flow[target_frame, pixel[:, point, 1], pixel[:, point, 0]] = step[:, point]
    return motion_flow


# ----------------------------------------------------------------------------------------------
# Both stages
# ----------------------------------------------------------------------------------------------

def video_motion_flow(video: Tensor, raft: nn.Module, cfg: MotionFromVideoConfig,
                      generator: torch.Generator) -> Tensor:
    """Training motion flow of one clip [F, 3, H, W] in [-1, 1] -> [F, H, W, 2] on RAFT's device.

    Stage "dense": every RAFT flow.  Stage "sparse": the flow along tracked keypoints, not yet
    blurred (the official sparse stage blurs it before the flow -> RGB step, see tora.trajectory).
    """
    flows = raft_flows(raft, video, cfg)
    if cfg.stage == "dense":
        return dense_motion_flow(flows)
    if cfg.stage == "sparse":
        _, height, width, _ = flows.shape
        return sparse_flow_from_tracks(track_keypoints(flows, cfg, generator), height, width)
    raise ConfigError(f"unknown motion_from_video.stage {cfg.stage!r}; choose 'dense' or 'sparse'")


# ----------------------------------------------------------------------------------------------
# Motion from a training clip (the same motion-video path as sampling)
# ----------------------------------------------------------------------------------------------

RAFT_MIN_SIZE = 128  # RAFT's correlation pyramid needs frames of at least 128 x 128 pixels


@torch.no_grad()
def clip_flows(raft: Optional[nn.Module], clip: Tensor, cfg) -> Tensor:
    """Flows [F-1, H, W, 2] of a clip [F, 3, H, W] in [-1, 1]: :func:`raft_flows`, or
    :func:`farneback_flows` with ``motion_from_video.flow_estimator: farneback`` (no RAFT).

    Full-size clips go straight through (official).  Frames below RAFT's 128-pixel minimum, or not a
    multiple of 8 (tiny demo/CI models), are resized (bilinear) for the flow estimate only; the flow
    is resized back and its vectors rescaled to the clip's pixels.
    """
    if cfg.flow_estimator == "farneback":
        return farneback_flows(clip, cfg).to(clip.device)
    height, width = clip.shape[-2:]
    scale = max(1.0, RAFT_MIN_SIZE / min(height, width))
    size = tuple(math.ceil(s * scale / 8) * 8 for s in (height, width))
    if size == (height, width):
        return raft_flows(raft, clip, cfg)
    frames = F.interpolate(clip.float(), size=size, mode="bilinear", align_corners=False)
    flows = raft_flows(raft, frames, cfg).permute(0, 3, 1, 2)  # [F-1, 2, h', w']
    flows = F.interpolate(flows, size=(height, width), mode="bilinear", align_corners=False)
    ratio = torch.tensor([width / size[1], height / size[0]], device=flows.device)
    return flows.permute(0, 2, 3, 1) * ratio


@torch.no_grad()
def motion_video_from_clip(clip: Tensor, raft: nn.Module, motion_cfg, trajectory_cfg,
                           generator: torch.Generator, flows: Optional[Tensor] = None) -> Tensor:
    """Training motion video [1, 3, F, H, W] in [-1, 1] (the VAE input) of a clip [F, 3, H, W].

    Stage "dense" (``motion_from_video.stage``): [zero flow, F-1 RAFT flows], no blur.  Stage
    "sparse": keypoints sampled on the first flow and tracked through the others
    (:func:`track_keypoints`), then rasterised, blurred and coloured by
    ``trajectory.tracks_to_video`` - the function sampling uses for point files.  Colours are
    normalised per ``trajectory.flow_image_chunk_frames`` frames in both stages.  ``flows``: the
    clip's flows when already known (``args.cache_latents``).
    """
    flows = clip_flows(raft, clip, motion_cfg) if flows is None else flows
    if motion_cfg.stage == "dense":
        return rgb_to_video(flow_to_rgb(dense_motion_flow(flows), trajectory_cfg.flow_image_chunk_frames))
    if motion_cfg.stage != "sparse":
        raise ConfigError(f"unknown motion_from_video.stage {motion_cfg.stage!r}; choose 'dense' or 'sparse'")
    tracks = track_keypoints(flows, motion_cfg, generator)  # [F, N, 2] float (x, y), inside the frame
    pixels = tracks.round().long().permute(1, 0, 2)  # [N, F, 2]: the format of point-file tracks
    return tracks_to_video(pixels, tuple(clip.shape[-2:]), trajectory_cfg).video


def worker_flows(motion_cfg) -> Optional[Callable[[Tensor], Tensor]]:
    """The flow function the data-loader workers run for each item: a CPU estimator (Farneback) runs
    there, in parallel over the workers; RAFT runs on the GPU in ``train_inputs.BatchPreparer``."""
    if motion_cfg.stage == "none" or motion_cfg.flow_estimator != "farneback":
        return None
    return functools.partial(farneback_flows, cfg=motion_cfg)


# ----------------------------------------------------------------------------------------------
# Point tracking without weights: pyramidal Lucas-Kanade (evaluation, motion transfer)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LKParams:
    """OpenCV pyramidal Lucas-Kanade settings of ``track_points_lk``."""
    window_size: int = 15  # px, the LK window (odd)
    pyramid_levels: int = 3  # extra pyramid levels (motion up to ~window * 2^levels px per frame)
    fb_threshold: float = 1.0  # px: largest forward-backward error of a visible point
    max_iterations: int = 30
    epsilon: float = 0.01  # px, the iteration stops below this update


def track_points_lk(frames: np.ndarray, points: np.ndarray, *, params: LKParams = LKParams()
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Track points through a video with pyramidal Lucas-Kanade and a forward-backward check.

    frames: uint8 [F, H, W, 3] RGB.  points: float [N, 2] (x, y) pixel positions in frame 0 (x the
    column, pixel centres at integers).
    Returns tracks float32 [F, N, 2] (x, y) per frame, tracks[0] = points, and visible bool [F, N].

    Each step t -> t+1 tracks the still-visible points forward, then the result backward; a point
    stays visible while both LK runs converge, the backward result lands within
    ``params.fb_threshold`` px of where it started and the point stays inside the frame.  A point
    that fails is lost for good: its position is frozen at the last visible one and ``visible``
    is False from that frame on (frame 0: False for a point outside the frame).
    """
    frames, points = np.asarray(frames), np.asarray(points, np.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3] RGB, got {frames.dtype} {list(frames.shape)}")
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must be [N, 2] (x, y), got {list(points.shape)}")
    num_frames, height, width, _ = frames.shape
    # All three channels (OpenCV's LK sums the per-channel terms): a red object on a grey
    # background of the same luminance is invisible in a grey-level image.
    images = [np.ascontiguousarray(frame) for frame in frames]
    lk = dict(winSize=(params.window_size, params.window_size), maxLevel=params.pyramid_levels,
              criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, params.max_iterations, params.epsilon))
    tracks = np.empty((num_frames, len(points), 2), np.float32)
    visible = np.zeros((num_frames, len(points)), bool)
    tracks[0] = points
    visible[0] = _inside(points, height, width)
    for t in range(num_frames - 1):
        tracks[t + 1], visible[t + 1] = tracks[t], False
        alive = np.flatnonzero(visible[t])
        if len(alive) == 0:
            continue
        start = tracks[t, alive].reshape(-1, 1, 2)
        forward, ok_forward, _ = cv2.calcOpticalFlowPyrLK(images[t], images[t + 1], start, None, **lk)
        backward, ok_backward, _ = cv2.calcOpticalFlowPyrLK(images[t + 1], images[t], forward, None, **lk)
        forward = forward.reshape(-1, 2)
        consistent = np.linalg.norm(backward.reshape(-1, 2) - start.reshape(-1, 2), axis=1) <= params.fb_threshold
        good = ok_forward.ravel().astype(bool) & ok_backward.ravel().astype(bool) & consistent
        good &= _inside(forward, height, width)
        tracks[t + 1, alive[good]] = forward[good]
        visible[t + 1, alive[good]] = True
    return tracks, visible


def _inside(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """[N] bool: (x, y) within the frame's pixel centres [0, W-1] x [0, H-1]."""
    return ((points[:, 0] >= 0) & (points[:, 0] <= width - 1) & (points[:, 1] >= 0)
            & (points[:, 1] <= height - 1))
