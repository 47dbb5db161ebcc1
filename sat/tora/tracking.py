"""Motion conditioning from training videos (spec 7.3): RAFT optical flow between consecutive frames,
then either the dense flow (stage 1) or the flow along a few tracked keypoints (stage 2).

    cfg = config.motion_from_video
    raft = load_raft(cfg, device)
    motion_flow = video_motion_flow(video, raft, cfg, generator)       # [F, H, W, 2]

or step by step:

    flows = raft_flows(raft, video, cfg)                # [F-1, H, W, 2]
    dense = dense_motion_flow(flows)                    # [F, H, W, 2]  (stage "dense")
    tracks = track_keypoints(flows, cfg, generator)     # [F, N, 2]     (stage "sparse")
    sparse = sparse_flow_from_tracks(tracks, H, W)      # [F, H, W, 2]

One flow convention throughout, shared with the trajectory point files (spec 1.5): a motion flow has
one frame per video frame; frame t+1 holds the motion from frame t to frame t+1 as (dx, dy) pixels,
located at frame t's pixels; frame 0 is zero.  Points are (x, y) with x the column.

The sparse flow returned here is not blurred yet: the Gaussian blur and the flow -> RGB step belong
to ``tora.trajectory`` and are shared with inference.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.optical_flow import Raft_Large_Weights, Raft_Small_Weights, raft_large, raft_small

from tora.checkpoint import CheckpointNotFoundError
from tora.config import ConfigError, MotionFromVideoConfig

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
