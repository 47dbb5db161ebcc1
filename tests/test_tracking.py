"""Motion from training videos: RAFT loading/flows, dense stage, keypoint sampling and tracking."""
import pytest
import torch
from torchvision.models.optical_flow import raft_large, raft_small

from tora.config import ConfigError, MotionFromVideoConfig, load_config
from tora.tracking import (dense_motion_flow, keypoint_candidates, load_raft, raft_flows, sample_keypoints,
                           sparse_flow_from_tracks, track_keypoints, track_points, video_motion_flow)

SMALL_URL = "https://download.pytorch.org/models/raft_small_C_T_V2-01064c6d.pth"
LARGE_URL = "https://download.pytorch.org/models/raft_large_C_T_SKHT_V2-ff5fadd5.pth"


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    """A raft_small state dict with random weights, saved like torchvision's published file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("raft") / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def small_raft(small_weights):
    return load_raft(MotionFromVideoConfig(raft_model="raft_small", raft_weights=str(small_weights)))


def random_clip(frames=4, size=128):  # RAFT's correlation pyramid needs frames of >= 128 px
    return torch.rand(frames, 3, size, size, generator=generator(1)) * 2 - 1


# ----------------------------------------------------------------------------------------------
# config and RAFT
# ----------------------------------------------------------------------------------------------

def test_config_section_defaults_and_choices():
    cfg = load_config().motion_from_video
    assert (cfg.raft_model, cfg.raft_iterations, cfg.stage, cfg.grid_stride, cfg.tracking) == \
        ("raft_large", 12, "dense", 32, "official")
    assert (cfg.min_points, cfg.max_points) == (1, 16)
    assert cfg.raft_weights == "ckpts/raft/raft_large_C_T_SKHT_V2-ff5fadd5.pth"
    with pytest.raises(ConfigError, match="'motion_from_video.stage'"):
        load_config([], ["motion_from_video.stage=medium"])
    with pytest.raises(ConfigError, match="unknown config key 'motion_from_video.strides'"):
        load_config([], ["motion_from_video.strides=4"])


@pytest.mark.parametrize("model, url", [("raft_large", LARGE_URL), ("raft_small", SMALL_URL)])
def test_missing_weights_names_path_and_url(tmp_path, model, url):
    missing = tmp_path / "nowhere" / "raft.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_raft(MotionFromVideoConfig(raft_model=model, raft_weights=str(missing)))
    assert str(missing) in str(err.value) and url in str(err.value)
    assert "motion_from_video.raft_weights" in str(err.value)


def test_weights_of_the_other_variant_are_a_clear_error(small_weights):
    with pytest.raises(ValueError, match=r"raft_small\.pth does not hold raft_large weights"):
        load_raft(MotionFromVideoConfig(raft_model="raft_large", raft_weights=str(small_weights)))


def test_loaded_raft_is_frozen_eval_and_holds_the_file(small_raft, small_weights):
    assert not small_raft.training
    assert not any(p.requires_grad for p in small_raft.parameters())
    saved = torch.load(small_weights)
    assert all(torch.equal(saved[name], value) for name, value in small_raft.state_dict().items())


def test_raft_flows_shapes_order_and_batching(small_raft):
    clip = random_clip(frames=4)
    cfg = MotionFromVideoConfig(raft_model="raft_small", raft_iterations=2, raft_batch_pairs=2)
    flows = raft_flows(small_raft, clip, cfg)
    assert flows.shape == (3, 128, 128, 2) and flows.dtype == torch.float32
    # pair t is frame t -> t+1, last estimate, (dx, dy) channels last
    with torch.no_grad():
        direct = small_raft(clip[2:3], clip[3:4], num_flow_updates=2)[-1]
    torch.testing.assert_close(flows[2], direct[0].permute(1, 2, 0))
    # batching is a memory setting only
    one_by_one = raft_flows(small_raft, clip, MotionFromVideoConfig(raft_iterations=2, raft_batch_pairs=1))
    torch.testing.assert_close(one_by_one, flows, atol=1e-4, rtol=1e-4)


def test_raft_large_loads_from_a_local_file(tmp_path):
    path = tmp_path / "raft_large.pth"
    torch.save(raft_large(weights=None).state_dict(), path)
    raft = load_raft(MotionFromVideoConfig(raft_weights=str(path)))
    flows = raft_flows(raft, random_clip(frames=2), MotionFromVideoConfig(raft_iterations=1))
    assert flows.shape == (1, 128, 128, 2)


def test_raft_flows_rejects_a_single_frame(small_raft):
    with pytest.raises(ValueError, match=r"expected a clip \[F >= 2, 3, H, W\], got \(1, 3, 128, 128\)"):
        raft_flows(small_raft, random_clip(frames=1), MotionFromVideoConfig())


# ----------------------------------------------------------------------------------------------
# dense stage
# ----------------------------------------------------------------------------------------------

def test_dense_motion_flow_prepends_a_zero_frame():
    flows = torch.randn(5, 8, 16, 2)
    dense = dense_motion_flow(flows)
    assert dense.shape == (6, 8, 16, 2)
    assert not dense[0].any()
    assert torch.equal(dense[1:], flows)


def test_video_motion_flow_both_stages(small_raft):
    clip = random_clip(frames=3)
    dense_cfg = MotionFromVideoConfig(raft_model="raft_small", raft_iterations=2)
    flows = raft_flows(small_raft, clip, dense_cfg)
    torch.testing.assert_close(video_motion_flow(clip, small_raft, dense_cfg, generator()), dense_motion_flow(flows))
    sparse_cfg = MotionFromVideoConfig(raft_model="raft_small", raft_iterations=2, stage="sparse")
    sparse = video_motion_flow(clip, small_raft, sparse_cfg, generator(3))
    tracks = track_keypoints(flows, sparse_cfg, generator(3))
    torch.testing.assert_close(sparse, sparse_flow_from_tracks(tracks, 128, 128))


# ----------------------------------------------------------------------------------------------
# tracking on a constructed flow: an object translating over a static background
# ----------------------------------------------------------------------------------------------

def translating_square(velocity, frames=8, size=64, side=24, corner=(8.0, 8.0)):
    """Flows [frames-1, size, size, 2] of a side x side square moving by ``velocity`` (dx, dy) per
    frame from ``corner`` (x, y); the background is static.  Returns flows and the square's corners."""
    velocity = torch.tensor(velocity)
    corners = torch.tensor(corner) + torch.arange(frames)[:, None] * velocity  # [frames, 2]
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    flows = torch.zeros(frames - 1, size, size, 2)
    for t, (x0, y0) in enumerate(corners[:-1].tolist()):
        inside = (xs >= x0) & (xs <= x0 + side) & (ys >= y0) & (ys <= y0 + side)
        flows[t][inside] = velocity
    return flows, corners


def test_subpixel_tracking_follows_the_true_path():
    flows, corners = translating_square((1.7, -0.6), corner=(8.0, 30.0))
    start = torch.tensor([[12.0, 36.0], [15.0, 40.0]])
    tracks = track_points(flows, start, "subpixel")
    truth = start + (corners - corners[0])[:, None]
    torch.testing.assert_close(tracks, truth)
    background = track_points(flows, torch.tensor([[50.0, 5.0]]), "subpixel")
    assert torch.equal(background, torch.tensor([[50.0, 5.0]]).expand(8, 1, 2))


def test_official_tracking_follows_integer_motion():
    flows, corners = translating_square((2.0, 3.0))
    start = torch.tensor([[12.0, 14.0]])
    truth = start + (corners - corners[0])[:, None]
    torch.testing.assert_close(track_points(flows, start, "official"), truth)


def test_official_tracking_truncates_fractional_motion():
    flows, _ = translating_square((1.7, -2.5), corner=(8.0, 30.0))
    start = torch.tensor([[28.0, 40.0]])  # near the leading edge: it lags behind the square
    steps = track_points(flows, start, "official").diff(dim=0)
    assert torch.equal(steps, torch.tensor([[[1.0, -2.0]]]).expand(7, 1, 2))  # true step (1.7, -2.5)


def test_official_tracking_never_moves_points_slower_than_one_pixel():
    """Known failure of the official tracker (spec 10.6); the subpixel mode moves them."""
    flows, corners = translating_square((0.6, 0.4))
    start = torch.tensor([[12.0, 12.0]])
    official = track_points(flows, start, "official")
    assert torch.equal(official, start.expand(8, 1, 2))
    subpixel = track_points(flows, start, "subpixel")
    torch.testing.assert_close(subpixel[-1, 0], start[0] + 7 * torch.tensor([0.6, 0.4]))


def test_subpixel_lookup_is_bilinear_in_x_and_y():
    """An affine flow is reproduced exactly by bilinear sampling; x and y must not be swapped."""
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(48.0), indexing="ij")
    flow = torch.stack([0.05 * xs + 0.3, -0.02 * ys + 0.1], dim=-1)  # [32, 48, 2]
    position = torch.tensor([[3.25, 7.5]])
    track = track_points(torch.stack([flow, flow]), position, "subpixel")
    x, y = 3.25, 7.5
    for t in range(2):
        x, y = x + 0.05 * x + 0.3, y - 0.02 * y + 0.1
        torch.testing.assert_close(track[t + 1, 0], torch.tensor([x, y]))


def test_tracks_are_clamped_to_the_frame():
    flows = torch.zeros(3, 16, 20, 2)
    flows[..., 0], flows[..., 1] = 7.0, -7.0  # everything moves right and up
    for mode in ("official", "subpixel"):
        track = track_points(flows, torch.tensor([[10.0, 10.0]]), mode)
        assert track[:, 0].tolist() == [[10.0, 10.0], [17.0, 3.0], [19.0, 0.0], [19.0, 0.0]]


def test_unknown_tracking_mode():
    with pytest.raises(ValueError, match="unknown motion_from_video.tracking 'nearest'"):
        track_points(torch.zeros(1, 8, 8, 2), torch.zeros(1, 2), "nearest")


# ----------------------------------------------------------------------------------------------
# sparse flow rasterisation (convention of spec 1.5)
# ----------------------------------------------------------------------------------------------

def test_sparse_flow_writes_each_step_at_the_previous_position_in_the_next_frame():
    tracks = torch.tensor([[[2.0, 3.0]], [[4.0, 3.0]], [[4.0, 6.0]]])  # [F=3, N=1, 2]
    motion_flow = sparse_flow_from_tracks(tracks, 8, 8)
    assert motion_flow.shape == (3, 8, 8, 2)
    assert not motion_flow[0].any()
    assert motion_flow[1, 3, 2].tolist() == [2.0, 0.0]
    assert motion_flow[2, 3, 4].tolist() == [0.0, 3.0]
    assert motion_flow.abs().sum().item() == 5.0  # nothing else written


def test_sparse_flow_later_points_overwrite_earlier_ones():
    tracks = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[2.0, 1.0], [1.0, 4.0]]])  # both start at (1, 1)
    assert sparse_flow_from_tracks(tracks, 8, 8)[1, 1, 1].tolist() == [0.0, 3.0]


# ----------------------------------------------------------------------------------------------
# keypoint sampling
# ----------------------------------------------------------------------------------------------

def test_candidates_one_per_cell_inside_the_frame():
    candidates = keypoint_candidates(80, 100, 32, generator())
    assert candidates.shape == (3 * 4, 2)
    cells = candidates // 32
    assert sorted(map(tuple, cells.tolist())) == [(x, y) for x in range(4) for y in range(3)]
    assert (candidates[:, 0] < 100).all() and (candidates[:, 1] < 80).all()
    many = torch.cat([keypoint_candidates(64, 64, 32, generator(s)) for s in range(50)])
    assert set((many % 32).flatten().tolist()) == set(range(32))  # offsets cover [0, 31]


def test_keypoints_land_on_moving_regions_with_counts_in_range():
    first_flow = torch.zeros(128, 128, 2)
    first_flow[:, 64:, 0] = 5.0  # only the right half moves: 8 moving cells
    cfg = MotionFromVideoConfig(min_points=2, max_points=5)
    counts = set()
    for seed in range(40):
        points = sample_keypoints(first_flow, cfg, generator(seed))
        counts.add(len(points))
        assert (points[:, 0] >= 64).all()
        assert len(set(map(tuple, points.tolist()))) == len(points)  # without replacement
    assert counts == {2, 3, 4, 5}


def test_keypoint_draws_are_proportional_to_flow_magnitude():
    first_flow = torch.zeros(128, 128, 2)
    first_flow[:, :64, 1] = 1.0
    first_flow[:, 64:, 1] = -3.0  # three times faster: 3/4 of single draws
    cfg = MotionFromVideoConfig(min_points=1, max_points=1)
    gen = generator()
    fast = sum(int(sample_keypoints(first_flow, cfg, gen)[0, 0] >= 64) for _ in range(2000))
    assert 0.72 < fast / 2000 < 0.78


def test_static_first_frame_pair_draws_uniformly_without_crashing():
    cfg = MotionFromVideoConfig(min_points=16, max_points=16)
    points = sample_keypoints(torch.zeros(128, 128, 2), cfg, generator())
    assert len(points) == 16 and len(set(map(tuple, points.tolist()))) == 16
    tiny = sample_keypoints(torch.zeros(64, 64, 2), cfg, generator())
    assert len(tiny) == 4  # only 4 grid cells exist


def test_fewer_moving_cells_than_points_takes_what_moves():
    first_flow = torch.zeros(128, 128, 2)
    first_flow[32:64, 64:96] = 2.0  # exactly one grid cell moves
    points = sample_keypoints(first_flow, MotionFromVideoConfig(min_points=8, max_points=8), generator())
    assert len(points) == 1 and (points // 32).tolist() == [[2, 1]]


def test_point_count_limits_are_checked():
    with pytest.raises(ValueError, match="min_points <= motion_from_video.max_points, got 5 and 2"):
        sample_keypoints(torch.ones(64, 64, 2), MotionFromVideoConfig(min_points=5, max_points=2), generator())


def test_sparse_tracking_is_deterministic_per_seed():
    flows, _ = translating_square((1.5, 0.5), size=128, side=60)
    flows = flows + torch.rand(flows.shape, generator=generator(9))  # every cell moves a bit
    cfg = MotionFromVideoConfig(stage="sparse", tracking="subpixel")
    first = track_keypoints(flows, cfg, generator(7))
    assert torch.equal(first, track_keypoints(flows, cfg, generator(7)))
    assert not torch.equal(first[0], track_keypoints(flows, cfg, generator(8))[0])
