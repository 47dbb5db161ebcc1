"""The DiT: full-size key/shape lists, motion caching, input validation."""
from pathlib import Path

import pytest
import torch

from tora.checkpoint import DIT_PREFIX, init_on_device
from tora.config import load_config, network_params_from
from tora.dit import DiffusionTransformer

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO.parent / "shared" / "spec"


def read_key_list(path: Path) -> dict[str, tuple]:
    keys = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, shape, dtype = line.split("\t")
        keys[name] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    return keys


@pytest.mark.parametrize("variant, key_file", [("cogvideox_5b_tora.yaml", "keys_t2v.txt"),
                                              ("cogvideox_5b_tora_i2v.yaml", "keys_i2v.txt")])
def test_full_size_keys_match_the_published_checkpoints(variant, key_file):
    if not (SPEC / key_file).is_file():
        pytest.skip(f"{SPEC / key_file} not available")
    expected = read_key_list(SPEC / key_file)
    cfg = load_config([REPO / "configs/tora/model" / variant])
    with init_on_device("meta"):
        model = DiffusionTransformer(cfg.model.network_config.params, dtype=torch.bfloat16)
    got = {DIT_PREFIX + k: (tuple(v.shape), str(v.dtype).replace("torch.", ""))
           for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    mismatched = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert mismatched == {}
    assert sum(v.numel() for v in model.parameters()) > 6.2e9  # 6.26 B parameters


TINY = dict(time_embed_dim=16, num_frames=9, time_compressed_rate=4, latent_width=12, latent_height=8,
            num_layers=2, patch_size=2, in_channels=16, out_channels=16, hidden_size=64, num_attention_heads=2,
            modules={"pos_embed_config": {"params": {"hidden_size_head": 32, "text_length": 5}},
                     "patch_embed_config": {"params": {"text_hidden_size": 8}}},
            traj_extractor={"channels": 32}, fuser={"num_groups": 8})


@pytest.fixture(scope="module")
def tiny_dit():
    torch.manual_seed(0)
    model = DiffusionTransformer(network_params_from(TINY)).eval()
    with torch.no_grad():  # make the zero-initialised parts active
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tiny_inputs(batch=2, frames=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, frames, 16, 8, 12, generator=g)
    t = torch.tensor([999.0, 400.0])[:batch]
    ctx = torch.randn(batch, 5, 8, generator=g)
    flow = torch.randn(batch, frames, 16, 8, 12, generator=g)
    return x, t, ctx, flow


def test_motion_cache_levels_compute_the_same_function(tiny_dit):
    x, t, ctx, flow = tiny_inputs()
    with torch.no_grad():
        inline = tiny_dit(x, t, ctx, video_flow=flow)
        features = tiny_dit(x, t, ctx, motion=tiny_dit.prepare_motion(flow, "features"))
        modulation = tiny_dit(x, t, ctx, motion=tiny_dit.prepare_motion(flow, "modulation"))
        no_motion = tiny_dit(x, t, ctx)
    torch.testing.assert_close(features, inline, rtol=0, atol=0)
    torch.testing.assert_close(modulation, inline, rtol=1e-5, atol=1e-5)
    assert (no_motion - inline).abs().max() > 1e-3  # the motion path is active


def test_one_motion_broadcasts_over_the_batch(tiny_dit):
    x, t, ctx, flow = tiny_inputs()
    shared = flow[:1]
    with torch.no_grad():
        duplicated = tiny_dit(x, t, ctx, motion=tiny_dit.prepare_motion(shared.expand(2, -1, -1, -1, -1), "modulation"))
        broadcast = tiny_dit(x, t, ctx, motion=tiny_dit.prepare_motion(shared, "modulation"))
    torch.testing.assert_close(broadcast, duplicated, rtol=1e-5, atol=1e-5)


def test_fewer_latent_frames_than_configured(tiny_dit):
    x, t, ctx, flow = tiny_inputs(frames=2)
    with torch.no_grad():
        out = tiny_dit(x, t, ctx, video_flow=flow)
    assert out.shape == x.shape


def test_fresh_fusers_are_the_identity():
    torch.manual_seed(0)
    model = DiffusionTransformer(network_params_from(TINY)).eval()
    x, t, ctx, flow = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx, video_flow=flow), model(x, t, ctx), rtol=0, atol=0)


@pytest.mark.parametrize("shape, message", [
    ((2, 3, 16, 10, 12), "latent size 10x12, but the model is configured for 8x12"),
    ((2, 4, 16, 8, 12), "at most 3"),
    ((2, 3, 8, 8, 12), "x has 8 channels, the model expects 16"),
])
def test_inputs_that_do_not_fit_are_explained(tiny_dit, shape, message):
    _, t, ctx, _ = tiny_inputs()
    with pytest.raises(ValueError, match=message):
        tiny_dit(torch.zeros(shape), t, ctx)


def test_shipped_configs_validate():
    for path in (REPO / "configs").rglob("*.yaml"):
        load_config([path])


@pytest.mark.parametrize("padding", ["replicate", "zeros"])
def test_fuser_temporal_padding_setting(padding):
    """fuser.temporal_padding reaches the temporal convs: zeros drops the end frames' outer taps."""
    from tora.dit import MotionGuidanceFuser
    fuser = MotionGuidanceFuser(8, 32, num_groups=4, temporal_padding=padding)
    torch.manual_seed(0)
    for conv in (fuser.flow_gamma_temporal, fuser.flow_beta_temporal):
        torch.nn.init.normal_(conv.weight)
    frames, feature = 4, torch.randn(4, 8, 3, 3)  # [(B T), F, h, w] with B = 1
    gamma, _ = fuser.modulation(feature, frames)  # [1, T*h*w, 32]
    y = fuser.flow_gamma_spatial(feature)  # [T, 8, 3, 3]
    seq = y.permute(2, 3, 1, 0).reshape(9, 8, frames)  # [(h w), D/4, T]
    pad = seq[..., :1] if padding == "replicate" else torch.zeros_like(seq[..., :1])
    padded = torch.cat([pad, seq, seq[..., -1:] if padding == "replicate" else pad], dim=-1)
    expected = torch.nn.functional.conv1d(padded, fuser.flow_gamma_temporal.weight, fuser.flow_gamma_temporal.bias)
    expected = expected.reshape(1, 3, 3, 32, frames).permute(0, 4, 1, 2, 3).reshape(1, frames * 9, 32)
    torch.testing.assert_close(gamma, expected)


def test_config_temporal_padding_builds_the_fusers():
    params = network_params_from({**TINY, "fuser": {"num_groups": 8, "temporal_padding": "zeros"}})
    model = DiffusionTransformer(params)
    assert {f.flow_beta_temporal.padding_mode for f in model.mixins.adaln_layer.fuser_list} == {"zeros"}
