"""The 3-D causal VAE: config mapping, official checkpoint keys, strict loading, encode/decode schedules."""
import re
from pathlib import Path

import pytest
import torch

from tora.checkpoint import CheckpointError
from tora.config import ConfigError, load_config
from tora.vae import (Posterior, VideoAutoencoder, chunk_spans, diffusers_to_official_key, first_stage_params_from,
                      load_vae, official_to_diffusers_key)

REPO = Path(__file__).resolve().parents[1]
KEYS_FILE = REPO.parent / "shared" / "spec" / "keys_vae.txt"
TINY_CODER = {"ch": 32, "ch_mult": [1, 2, 1, 1], "num_res_blocks": 1, "z_channels": 16}


def tiny_params(**settings):
    coder = {"params": dict(TINY_CODER)}
    return first_stage_params_from({"params": {"encoder_config": coder, "decoder_config": coder, **settings}},
                                   "test")


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VideoAutoencoder(tiny_params()).eval()


def video(frames, batch=1, height=16, width=24, seed=0):
    return torch.rand(batch, 3, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latents(frames, batch=1, height=2, width=3, seed=0):
    return torch.randn(batch, 16, frames, height, width, generator=torch.Generator().manual_seed(seed))


# -- config -------------------------------------------------------------------------------------

def test_full_size_official_config_gives_the_official_key_list():
    if not KEYS_FILE.is_file():
        pytest.skip(f"{KEYS_FILE} not present")
    expected = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            expected[key] = (tuple(int(n) for n in re.findall(r"\d+", shape)), dtype)
    params = load_config([REPO / "configs/tora/model/cogvideox_5b_tora.yaml"]).model.first_stage_config.params
    with torch.device("meta"):
        full = VideoAutoencoder(params)
    got = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in full.official_state_dict().items()}
    assert got == expected


@pytest.mark.parametrize("coder_key, value, message", [
    ("attn_resolutions", [16], "encoder_config.params.attn_resolutions' = [16]: the CogVideoX VAE has no attention"),
    ("dropout", 0.1, "encoder_config.params.dropout' = 0.1"),
    ("ch", 24, "encoder_config.params.ch' x 'ch_mult' gives [24, 48, 24, 24] channels"),
    ("temporal_compress_times", 3, "encoder_config.params.temporal_compress_times' = 3: must be a power of 2 up to 2^3"),
])
def test_unrepresentable_encoder_settings_are_rejected_by_key(coder_key, value, message):
    coder = {"params": {**TINY_CODER, coder_key: value}}
    with pytest.raises(ConfigError, match=re.escape("model.first_stage_config.params." + message)):
        VideoAutoencoder(first_stage_params_from({"params": {"encoder_config": coder, "decoder_config": coder}}, "t"))


def test_encoder_and_decoder_must_share_the_network_shape():
    params = first_stage_params_from({"params": {"encoder_config": {"params": TINY_CODER},
                                                 "decoder_config": {"params": {**TINY_CODER, "ch": 64}}}}, "t")
    with pytest.raises(ConfigError, match=r"encoder_config.params.ch' = 32 and .*decoder_config.params.ch' = 64"):
        VideoAutoencoder(params)


@pytest.mark.parametrize("setting, value", [("decode_chunk_latent_frames", 3), ("encode_chunk_frames", 6),
                                            ("decode_tile_latent_size", 4), ("encode_tile_latent_size", 4),
                                            ("encode_tile_overlap_latent", -1)])
def test_bad_schedules_are_rejected(setting, value):
    with pytest.raises(ConfigError, match=f"'model.first_stage_config.params.{setting}' = {value}: must be"):
        VideoAutoencoder(tiny_params(**{setting: value}))


# -- checkpoint keys ----------------------------------------------------------------------------

def test_key_conversion_round_trip(vae):
    diffusers_keys = list(vae.autoencoder.state_dict())
    official = [diffusers_to_official_key(k, 4) for k in diffusers_keys]
    assert [official_to_diffusers_key(k, 4) for k in official] == diffusers_keys
    assert "decoder.up.0.block.0.nin_shortcut.weight" in official  # level 0 = the last diffusers up block
    assert official_to_diffusers_key("decoder.up.0.block.0.nin_shortcut.weight", 4) == \
        "decoder.up_blocks.3.resnets.0.conv_shortcut.weight"
    assert official_to_diffusers_key("encoder.mid.block_2.norm1.weight", 4) == "encoder.mid_block.resnets.1.norm1.weight"


def write_official(path, state):
    torch.save({"state_dict": state}, path)


def test_save_and_load_official_file(tmp_path, vae):
    path = tmp_path / "3d-vae.pt"
    vae.save_official(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert state.keys() == vae.official_state_dict().keys()
    state["loss.logvar"] = torch.zeros(())  # training-loss keys are dropped, as officially
    write_official(path, state)
    torch.manual_seed(1)
    other = load_vae(tiny_params(), path)
    for key, value in vae.autoencoder.state_dict().items():
        assert torch.equal(other.autoencoder.state_dict()[key], value), key


@pytest.mark.parametrize("edit, messages", [
    (lambda s: [s.pop(f"encoder.down.{i}.block.0.conv1.conv.weight") for i in (0, 1)],
     ["missing 2 key(s)", "encoder.down.*.block.*.conv1.conv.weight  (2 keys: encoder.down.0.block.0.conv1"]),
    (lambda s: s.update({"decoder.up.0.block.9.norm1.weight": torch.zeros(1)}),
     ["unexpected 1 key(s)", "decoder.up.0.block.9.norm1.weight"]),
    (lambda s: s.update({"encoder.conv_in.conv.bias": torch.zeros(5)}),
     ["1 shape mismatch(es)", "encoder.conv_in.conv.bias: checkpoint (5,) vs model (32,)"]),
])
def test_strict_load_names_the_bad_keys(tmp_path, vae, edit, messages):
    state = dict(vae.official_state_dict())
    edit(state)
    write_official(tmp_path / "3d-vae.pt", state)
    with pytest.raises(CheckpointError) as err:
        load_vae(tiny_params(), tmp_path / "3d-vae.pt")
    for message in messages:
        assert message in str(err.value)


def test_missing_file_names_path_and_readme_section(tmp_path):
    with pytest.raises(CheckpointError, match=r"not found: .*nowhere/3d-vae.pt .*README section 'Weights'"):
        load_vae(tiny_params(), tmp_path / "nowhere" / "3d-vae.pt")


# -- encode -------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames, latent_frames", [(1, 1), (5, 2), (9, 3)])
def test_encode_shapes(vae, frames, latent_frames):
    posterior = vae.encode(video(frames))
    assert posterior.moments.shape == (1, 32, latent_frames, 2, 3)
    assert posterior.mean.shape == posterior.logvar.shape == (1, 16, latent_frames, 2, 3)


def test_encode_one_sample_at_a_time_in_one_call(vae):
    clips = video(9, batch=2)
    together = vae.encode(clips).moments
    assert torch.allclose(together[1:], vae.encode(clips[1:]).moments, atol=1e-6)
    one_call, _ = vae.autoencoder.encoder(clips[:1])
    assert torch.allclose(together[:1], one_call, atol=1e-6)
    chunked = VideoAutoencoder(tiny_params(encode_chunk_frames=4))
    chunked.load_state_dict(vae.state_dict())
    in_chunks = chunked.encode(clips).moments
    assert in_chunks.shape == together.shape and not torch.allclose(in_chunks, together, atol=1e-3)


def test_posterior_clamps_logvar_and_samples_with_given_eps():
    moments = torch.cat([torch.zeros(1, 2, 1, 1, 1), torch.tensor([-50.0, 50.0]).view(1, 2, 1, 1, 1)], dim=1)
    posterior = Posterior(moments)
    assert posterior.logvar.flatten().tolist() == [-30.0, 20.0]
    eps = torch.ones(1, 2, 1, 1, 1)
    assert torch.allclose(posterior.sample(eps=eps).flatten(), torch.exp(torch.tensor([-15.0, 10.0])))
    with pytest.raises(ValueError, match=r"eps has shape \(1, 2\), the posterior \(1, 2, 1, 1, 1\)"):
        posterior.sample(eps=torch.ones(1, 2))


def test_sampling_is_one_draw_for_the_batch_and_deterministic(vae):
    posterior = vae.encode(video(5, batch=2))
    z = posterior.sample(generator=torch.Generator().manual_seed(7))
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(z, posterior.sample(eps=eps))
    assert torch.equal(z, posterior.sample(generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(z, posterior.sample(generator=torch.Generator().manual_seed(8)))


# -- decode -------------------------------------------------------------------------------------

def test_chunk_spans():
    official = [(0, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]  # sample_video.py, spec 1.9
    assert chunk_spans(13, 2) == official
    assert chunk_spans(5, 2) == [(0, 3), (3, 5)]
    assert chunk_spans(4, 2) == [(0, 2), (2, 4)]  # even T: nothing dropped
    assert chunk_spans(1, 2) == [(0, 1)]
    assert chunk_spans(49, 8) == [(0, 9), (9, 17), (17, 25), (25, 33), (33, 41), (41, 49)]
    assert chunk_spans(7, 0) == [(0, 7)]


@pytest.mark.parametrize("latent_frames, frames", [(1, 1), (3, 9), (5, 17), (2, 8), (4, 16)])
def test_decode_shapes_odd_and_even(vae, latent_frames, frames):
    assert vae.decode(latents(latent_frames)).shape == (1, 3, frames, 16, 24)


def test_chunked_decode_carries_the_cache_forward_only(vae):
    z = latents(5)
    decoded = vae.decode(z)  # [0:3] -> 9 frames, [3:5] -> 8 frames
    assert torch.equal(decoded[:, :, :9], vae.decode(z[:, :, :3]))
    changed = z.clone()
    changed[:, :, 0] += 1  # only in the first chunk: reaches the second one through the cache
    redecoded = vae.decode(changed)
    assert not torch.allclose(redecoded[:, :, 9:], decoded[:, :, 9:], atol=1e-4)
    changed = z.clone()
    changed[:, :, 4] += 1  # only in the last chunk: the first one must not see it
    assert torch.equal(vae.decode(changed)[:, :, :9], decoded[:, :, :9])


def test_decode_batch_is_per_sample(vae):
    z = latents(3, batch=2)
    assert torch.allclose(vae.decode(z)[1:], vae.decode(z[1:]), atol=1e-6)


def test_spatial_tiling(vae):
    tiled = VideoAutoencoder(tiny_params(decode_tile_latent_size=4, decode_tile_overlap_latent=2))
    tiled.load_state_dict(vae.state_dict())
    z = latents(1, height=6, width=7)  # tiles start at 0, 2 (rows) and 0, 2, 3 (columns)
    out = tiled.decode(z)
    assert out.shape == vae.decode(z).shape == (1, 3, 1, 48, 56)
    # Where only the first tile lies, the result is that tile's decode.
    assert torch.allclose(out[..., :16, :16], vae.decode(z[..., :4, :4])[..., :16, :16], atol=1e-6)
    one_tile = latents(1, height=4, width=4)
    assert torch.equal(tiled.decode(one_tile), vae.decode(one_tile))


def test_spatial_tiling_of_the_encoder(vae):
    tiled = VideoAutoencoder(tiny_params(encode_tile_latent_size=4, encode_tile_overlap_latent=2))
    tiled.load_state_dict(vae.state_dict())
    clip = video(5, height=48, width=56)  # latent 6 x 7: tiles start at 0, 2 (rows) and 0, 2, 3 (columns)
    moments = tiled.encode(clip).mean
    assert moments.shape == vae.encode(clip).mean.shape == (1, 16, 2, 6, 7)
    assert not torch.allclose(moments, vae.encode(clip).mean, atol=1e-4)  # tiles see less context
    # Latent pixels only the first tile covers are that tile's encode.
    first_tile = vae.encode(clip[..., :32, :32]).mean
    assert torch.allclose(moments[..., :2, :2], first_tile[..., :2, :2], atol=1e-6)
    one_tile = video(5, height=32, width=32)
    assert torch.equal(tiled.encode(one_tile).mean, vae.encode(one_tile).mean)


def test_bad_input_layouts(vae):
    with pytest.raises(ValueError, match=r"video must be \[b c f h w\] with 3 channels, got shape \(1, 5, 3, 16, 16\)"):
        vae.encode(torch.zeros(1, 5, 3, 16, 16))
    with pytest.raises(ValueError, match=r"z must be \[b c t h w\] with 16 channels"):
        vae.decode(torch.zeros(1, 3, 16, 2, 2))
